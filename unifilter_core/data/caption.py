"""Caption samples in the DataComp / img2dataset layout: ``<key>.{jpg|jpeg|png|webp}`` + ``<key>.txt`` + ``<key>.json``.

Text: the ``txt`` member (UTF-8, a leading BOM removed, otherwise kept as is); when it is absent, empty or blank
(only whitespace, NUL and other control or format characters, see :func:`~unifilter_core.data.text.is_blank_text`),
the json's ``caption`` field, unless that is blank too. No usable text -> ``missing_text`` (``empty_member`` when
the only text source was a zero-byte ``txt``). Image: the first of :data:`~unifilter_core.data.tars.IMAGE_EXTS` present.
The ``json`` member is optional; when present it must be a JSON object whose well-known fields have the right
types (:data:`CAPTION_FIELD_TYPES`), else ``json_decode_error`` / ``invalid_fields``. A zero-byte json counts as
absent. Failures carry ``uid``/``url`` in ``SampleFailure.extra`` when the json was readable, so score tables
can still say which sample failed.

Every json string UTF-8 cannot store (a lone surrogate) is escaped before anything else looks at it
(:mod:`unifilter_core.data.jsonmember`), so ``uid``, ``url``, the caption and ``meta`` are always writable; the
sample or failure is flagged ``uid_escaped`` / ``url_escaped`` / ``text_escaped`` (the ``caption`` field) /
``field_escaped`` (any other field). The raw row's flags (``key_escaped``) are carried over too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from unifilter_core.data.images import decode_image
from unifilter_core.data.jsonmember import clean_fields, parse_json_member
from unifilter_core.data.limits import ReaderLimits
from unifilter_core.data.tars import IMAGE_EXTS, RawSample, with_flags
from unifilter_core.data.text import is_blank_text
from unifilter_core.records import Reason, SampleFailure

__all__ = ["CAPTION_FIELD_TYPES", "CaptionSample", "decode_caption", "parse_json_member"]

logger = logging.getLogger(__name__)

#: img2dataset json fields we rely on and the types they may have (None is always allowed).
CAPTION_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "uid": (str, int),
    "url": (str,),
    "caption": (str,),
    "key": (str, int),
    "status": (str,),
    "width": (int, float),
    "height": (int, float),
    "original_width": (int, float),
    "original_height": (int, float),
}


@dataclass(slots=True)
class CaptionSample:
    """A decoded image-caption pair.

    Attributes:
        key: the sample's ``__key__``.
        image: the decoded image, mode ``RGB``.
        text: the caption (cut to ``max_text_chars`` when ``text_truncated``).
        meta: the sample json (empty when absent); ``uid`` and ``key`` are normalised to str when present.
        text_truncated: True when the caption was longer than ``ReaderLimits.max_text_chars``.
        flags: :class:`~unifilter_core.records.Flag` codes (escaped key, uid, url, caption or other json fields).
    """

    key: str
    image: Image.Image
    text: str
    meta: dict[str, Any] = field(default_factory=dict)
    text_truncated: bool = False
    flags: list[str] = field(default_factory=list)

    @property
    def uid(self) -> str | None:
        return self.meta.get("uid")

    @property
    def url(self) -> str | None:
        return self.meta.get("url")


def _check_fields(meta: dict[str, Any]) -> SampleFailure | None:
    for name, types in CAPTION_FIELD_TYPES.items():
        value = meta.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            return SampleFailure(
                Reason.INVALID_FIELDS,
                f"json field {name!r} is a {type(value).__name__}, expected {types[0].__name__}",
            )
    for name in ("uid", "key"):
        if meta.get(name) is not None:
            meta[name] = str(meta[name])
    return None


def _ids(meta: dict[str, Any]) -> dict[str, Any]:
    return {name: meta[name] for name in ("uid", "url") if isinstance(meta.get(name), str)}


def _decode_text(raw: RawSample, meta: dict[str, Any]) -> str | SampleFailure:
    txt = raw.members.get("txt")
    if txt:
        try:
            text = txt.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            return SampleFailure(Reason.TEXT_DECODE_ERROR, f"txt is not UTF-8: {exc}")
        if not is_blank_text(text):
            return text
    caption = meta.get("caption")
    if isinstance(caption, str) and not is_blank_text(caption):
        return caption
    if txt is not None and len(txt) == 0:
        return SampleFailure(Reason.EMPTY_MEMBER, "txt member has 0 bytes and the json has no caption")
    return SampleFailure(Reason.MISSING_TEXT, "no txt member text and no json caption (or only blank ones)")


def _with_ids(failure: SampleFailure, meta: dict[str, Any], flags: list[str]) -> SampleFailure:
    failure.extra.update(_ids(meta))
    return with_flags(failure, flags)


def _read_meta(raw: RawSample, flags: list[str]) -> dict[str, Any] | SampleFailure:
    """The sample json (empty when absent), cleaned and checked; escaped fields are added to ``flags``."""
    if not raw.members.get("json"):
        return {}
    meta = parse_json_member(raw.members["json"], "json member")
    if isinstance(meta, SampleFailure):
        return meta
    flags.extend(flag for flag in clean_fields(meta) if flag not in flags)
    bad = _check_fields(meta)
    return meta if bad is None else _with_ids(bad, meta, flags)


def decode_caption(raw: RawSample, limits: ReaderLimits | None = None) -> CaptionSample | SampleFailure:
    """One raw caption sample (a row of :func:`~unifilter_core.data.tars.iter_raw_samples`) as a
    :class:`CaptionSample`, or why not (``raw.failure`` or a new :class:`SampleFailure`); never raises on bad data.
    ``limits`` defaults to :class:`ReaderLimits`."""
    limits = limits or ReaderLimits()
    flags = list(raw.flags)
    if raw.failure is not None:
        return with_flags(raw.failure, flags)
    meta = _read_meta(raw, flags)
    if isinstance(meta, SampleFailure):
        return with_flags(meta, flags)
    text = _decode_text(raw, meta)
    if isinstance(text, SampleFailure):
        return _with_ids(text, meta, flags)
    ext = next((e for e in IMAGE_EXTS if e in raw.members), None)
    if ext is None:
        missing = SampleFailure(Reason.MISSING_IMAGE, f"no image member ({'|'.join(IMAGE_EXTS)})")
        return _with_ids(missing, meta, flags)
    image = decode_image(raw.members[ext], limits)
    if isinstance(image, SampleFailure):
        image.detail = f"{ext}: {image.detail}"
        return _with_ids(image, meta, flags)
    truncated = len(text) > limits.max_text_chars
    if truncated:
        text = text[: limits.max_text_chars]
    return CaptionSample(raw.key, image, text, meta=meta, text_truncated=truncated, flags=sorted(flags))
