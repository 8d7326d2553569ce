"""Limits the readers apply while decoding samples (valid input beyond a limit is ``skipped``, with a reason)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: PIL's own decompression-bomb threshold (``PIL.Image.MAX_IMAGE_PIXELS``), used as our default.
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True, slots=True)
class ReaderLimits:
    """What the readers refuse before or while decoding.

    Attributes:
        max_pixels: an image whose declared width x height exceeds this is refused BEFORE its pixels are decoded
            (``image_too_large``, skipped). PIL refuses on its own above ``2 * PIL.Image.MAX_IMAGE_PIXELS``; that
            becomes ``image_too_large`` as well, so the effective limit is the smaller of the two.
        max_member_bytes: a tar member larger than this is never read into memory. The whole sample is skipped:
            ``image_too_large`` for an image member, ``too_many_tokens`` for a text or JSON member (the detail
            names the member and its size).
        max_text_chars: captions longer than this are CUT to this many characters and flagged
            (``CaptionSample.text_truncated``): the processor keeps only the first ~75 tokens anyway, so the score
            is unchanged while the tokenizer never sees megabytes. Documents whose text slots together exceed it
            are SKIPPED (``too_many_tokens``), since a cut document would be scored on text it does not have.
        max_images: a document with more image slots than this is skipped (``too_many_images``) before any image
            is decoded; None disables the early check (the processor still applies its own limit).
        alpha: how transparency becomes RGB: ``"white"`` composites on a white background (what a browser shows),
            ``"drop"`` discards the alpha channel like PIL's ``convert("RGB")`` (what the original scorer did).
    """

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_member_bytes: int = 128 * 1024 * 1024
    max_text_chars: int = 100_000
    max_images: int | None = 10
    alpha: Literal["white", "drop"] = "white"

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_member_bytes", "max_text_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ReaderLimits.{name} must be a positive integer, got {value!r}")
        if self.max_images is not None and (
            not isinstance(self.max_images, int) or isinstance(self.max_images, bool) or self.max_images <= 0
        ):
            raise ValueError(
                f"ReaderLimits.max_images must be a positive integer or None, got {self.max_images!r}"
            )
        if self.alpha not in ("white", "drop"):
            raise ValueError(f"ReaderLimits.alpha must be 'white' or 'drop', got {self.alpha!r}")
