"""Model input preparation: image preprocessing and caption / interleaved-document formatting.

Follows the released UniFilter input format (reference-model.md, "Input format") with its documented bugs fixed:

* captions: ``[BOS, -200, tokens("\\n" + caption)..., EOS]``; the caption limit (75 ids in the original) keeps EOS;
* documents: text slots and ``<image>`` slots joined with ``"\\n\\n"``, ``BOS ... EOS``; documents over the image /
  token limits come back as a :class:`SampleFailure` (a row with a reason) instead of vanishing;
* images: padded to a grey square (``pad``, what training did) or stretched (``resize``, what the original scorer
  did), following the checkpoint's ``image_aspect_ratio`` unless overridden.

Everything here runs on CPU and is picklable, so a :class:`UniFilterProcessor` can be shipped to data-loader
workers. Bad data never raises: it becomes a :class:`SampleFailure`; ``ValueError`` is reserved for caller bugs.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import numpy as np
import torch
from PIL import Image

from unifilter_core.data.limits import DEFAULT_MAX_PIXELS
from unifilter_core.prepare import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, caption_ids, fit_ids
from unifilter_core.records import Reason, SampleFailure

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image-placeholder>"  # a literal "<image>" inside document text becomes this
PAD_COLOR = (127, 127, 127)  # int(0.5 * 255) per channel: the tower's image mean
DOC_SLOT_SEPARATOR = "\n\n"
# ProcessingConfig fields that come from the vision tower's image-processor config
_TOWER_FIELDS = ("resample", "rescale_factor", "image_mean", "image_std")


class AspectMode(str, Enum):
    """How a non-square image becomes square before the resize to the tower size."""

    PAD = "pad"  # expand to a square with PAD_COLOR, image centred (training)
    RESIZE = "resize"  # stretch (the original scorer)


#: Aspect names other code writes, and the mode they mean: LLaVA's default ``"square"`` (what checkpoints trained
#: with the original code without ``--image_aspect_ratio pad`` say) stretches, like ``resize``.
ASPECT_ALIASES: dict[str, str] = {"square": AspectMode.RESIZE.value}

#: PIL resampling filters a processor config may name (``resample`` in ``preprocessor_config.json``).
RESAMPLE_FILTERS: dict[int, str] = {int(f): f.name.lower() for f in Image.Resampling}


def normalize_aspect(value: str | None) -> str | None:
    """``"square"`` -> ``"resize"`` (see :data:`ASPECT_ALIASES`); other values unchanged."""
    return ASPECT_ALIASES.get(value, value) if isinstance(value, str) else value


def pixel_cost(width: int, height: int, aspect: str) -> int:
    """Pixels the preprocessing allocates for a ``width`` x ``height`` image before the resize.

    ``pad`` builds a ``max(w, h)`` square (a 2x40000 image costs 1.6e9 pixels), ``resize`` works on the image.
    """
    if aspect == AspectMode.PAD.value:
        side = max(width, height)
        return side * side
    return width * height


@dataclass(frozen=True, slots=True)
class ProcessingConfig:
    """Options of :class:`UniFilterProcessor` (``None`` disables a limit).

    Attributes:
        image_aspect_ratio: ``"pad"`` or ``"resize"`` (see :class:`AspectMode`).
        image_size: side of the square tower input, pixels (384 for SigLIP so400m).
        num_image_tokens: vectors one image contributes to the spliced sequence (144 released).
        max_length: longest spliced sequence (text + image tokens), ``tokenizer_model_max_length``.
        caption_max_tokens: longest caption id sequence, counted like the original (BOS, the image sentinel as
            one id, text, EOS); longer captions are cut keeping EOS.
        max_images: documents with more images are skipped (``too_many_images``).
        max_text_tokens: documents whose id sequence before splicing (BOS + text + one id per image + EOS, what
            the original compared with 6000) is longer are skipped (``too_many_tokens``).
        max_pixels: most pixels one image may cost before the resize (:func:`pixel_cost`: ``max(w, h)^2`` in
            pad mode, ``w * h`` in resize mode); a caption image over it is ``image_too_large`` (skipped), a
            document image over it is dropped with its slot. Checked before anything is allocated.
        resample: PIL resampling filter of the resize to ``image_size`` (3 bicubic: SigLIP; 2 bilinear: SigLIP2).
        rescale_factor: pixel values are multiplied by this (1/255).
        image_mean: per-channel mean subtracted after rescaling; the pad colour is ``int(mean * 255)``.
        image_std: per-channel divisor after the mean.
    """

    image_aspect_ratio: str = "pad"
    image_size: int = 384
    num_image_tokens: int = 144
    max_length: int = 4096
    caption_max_tokens: int | None = 75
    max_images: int | None = 10
    max_text_tokens: int | None = 6000
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    resample: int = int(Image.Resampling.BICUBIC)
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        modes = [m.value for m in AspectMode]
        if self.image_aspect_ratio in ASPECT_ALIASES:
            object.__setattr__(self, "image_aspect_ratio", ASPECT_ALIASES[self.image_aspect_ratio])
        if self.image_aspect_ratio not in modes:
            raise ValueError(
                f"image_aspect_ratio={self.image_aspect_ratio!r} is not one of {modes} "
                f"(or an alias: {', '.join(ASPECT_ALIASES)})"
            )
        for name in ("image_size", "num_image_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.max_length, int) or self.max_length < self.num_image_tokens + 2:
            raise ValueError(
                f"max_length={self.max_length!r} cannot hold BOS + one image ({self.num_image_tokens} tokens) + EOS; "
                f"use at least {self.num_image_tokens + 2}"
            )
        limits = {"caption_max_tokens": 3, "max_images": 0, "max_text_tokens": 2, "max_pixels": 1}
        for name, low in limits.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
                raise ValueError(f"{name} must be None (no limit) or an int >= {low}, got {value!r}")
        self._check_normalization()

    def _check_normalization(self) -> None:
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample={self.resample!r} is not a PIL filter; use one of {RESAMPLE_FILTERS}")
        if not isinstance(self.rescale_factor, (int, float)) or not 0 < self.rescale_factor <= 1:
            raise ValueError(f"rescale_factor must be a number in (0, 1], got {self.rescale_factor!r}")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if any(v <= 0 for v in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std!r}")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Colour of the padding in pad mode: the image mean in 8-bit (LLaVA's ``expand2square`` rule)."""
        return tuple(int(m * 255) for m in self.image_mean)  # type: ignore[return-value]

    @classmethod
    def from_model_config(
        cls, config: Any, *, vision_tower: str | None = None, **overrides: Any
    ) -> ProcessingConfig:
        """Build from a model config (``image_aspect_ratio``, ``num_image_tokens``, ``vision_config.image_size``,
        ``tokenizer_model_max_length``); keyword overrides whose value is ``None`` are ignored for the
        checkpoint-derived fields (aspect, size, tokens, max_length) and applied as given for the limits and the
        image-processor fields (``resample``, ``rescale_factor``, ``image_mean``, ``image_std``).

        The image-processor fields follow the tower (``modeling.vision_tower.image_processor_settings``: the
        ``preprocessor_config.json`` of ``vision_tower``, of the checkpoint folder or of a local ``mm_vision_tower``,
        else the built-in preset of a known tower name, else SigLIP's values)."""
        from unifilter_core.modeling.vision_tower import image_processor_settings

        tower = image_processor_settings(config, vision_tower)
        logger.info("image preprocessing from %s", tower.pop("source"))
        base = cls(
            **tower,
            image_aspect_ratio=normalize_aspect(getattr(config, "image_aspect_ratio", None)) or "pad",
            image_size=int(config.vision_config.image_size),
            num_image_tokens=int(config.num_image_tokens),
            max_length=int(getattr(config, "tokenizer_model_max_length", None) or 4096),
        )
        from_checkpoint = {
            "image_aspect_ratio",
            "image_size",
            "num_image_tokens",
            "max_length",
            *_TOWER_FIELDS,
        }
        kept = {k: v for k, v in overrides.items() if not (k in from_checkpoint and v is None)}
        if "image_aspect_ratio" in kept:
            kept["image_aspect_ratio"] = normalize_aspect(kept["image_aspect_ratio"])
        return replace(base, **kept)


@dataclass(slots=True)
class PreparedSample:
    """One sample ready for the model.

    Attributes:
        input_ids: token ids with ``IMAGE_TOKEN_INDEX`` at each image position, BOS first and EOS last.
        pixel_values: ``[n_images, 3, H, W]`` float32, images in sentinel order; None when there are none.
        n_images: images the model sees (== sentinels in ``input_ids``).
        n_tokens: length of the spliced sequence (each sentinel counted as ``num_image_tokens``).
        truncated: True when the sequence was cut to a limit (EOS is always kept).
        detail: a note about what was dropped (undecodable or 1-pixel images, empty slots); None if nothing.
    """

    input_ids: list[int]
    pixel_values: torch.Tensor | None
    n_images: int
    n_tokens: int
    truncated: bool = False
    detail: str | None = None


@dataclass(slots=True)
class _DocumentParts:
    """Slots of a document after decoding: strings to join and the images behind their ``<image>`` markers."""

    slots: list[str] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    has_text: bool = False


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Palette and alpha images are composited over white (what a viewer shows; ``convert("RGB")`` alone would expose
    the arbitrary colour under transparent pixels), 16/32-bit integer images are scaled to 8 bits instead of being
    clipped, float images in [0, 1] are scaled by 255; CMYK, YCbCr, L, 1, ... use PIL's conversion.
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        elif arr.size and arr.max() > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def expand_to_square(image: Image.Image, color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Pad an RGB image to a square of side ``max(w, h)`` with ``color``, the image centred (LLaVA's rule)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), color)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def decode_image(data: Image.Image | bytes | bytearray | memoryview) -> Image.Image | SampleFailure:
    """Decode encoded bytes (or pass a PIL image through), fully loading the pixels.

    Returns:
        The image, or a :class:`SampleFailure` (``image_too_large`` for decompression bombs, ``image_truncated``
        for cut-off files, ``image_decode_error`` otherwise).
    """
    if isinstance(data, Image.Image):
        return data
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
    except Image.DecompressionBombError as exc:
        return SampleFailure(Reason.IMAGE_TOO_LARGE, detail=str(exc))
    except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
        reason = Reason.IMAGE_TRUNCATED if "truncated" in str(exc).lower() else Reason.IMAGE_DECODE_ERROR
        return SampleFailure(reason, detail=f"{type(exc).__name__}: {exc}")
    except (ValueError, SyntaxError, EOFError) as exc:
        return SampleFailure(Reason.IMAGE_DECODE_ERROR, detail=f"{type(exc).__name__}: {exc}")
    return image


class UniFilterProcessor:
    """Tokenizer + image preprocessing + prompt formatting (CPU only, picklable).

    Args:
        tokenizer: a transformers tokenizer with distinct bos/eos/pad ids (see ``tokenization.load_tokenizer``).
        config: the processing options.
    """

    def __init__(self, tokenizer: Any, config: ProcessingConfig) -> None:
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(
                    f"tokenizer has no {name}; load it with unifilter_core.tokenization.load_tokenizer"
                )
        self.tokenizer = tokenizer
        self.config = config
        self.bos_id: int = int(tokenizer.bos_token_id)
        self.eos_id: int = int(tokenizer.eos_token_id)

    # ----------------------------------------------------------------------------------------------- text
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize_with_images(self, text: str) -> list[int]:
        """Split on ``<image>``, tokenize each chunk separately, join with ``IMAGE_TOKEN_INDEX`` (no BOS/EOS)."""
        ids: list[int] = []
        for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            if chunk:
                ids.extend(self.tokenize(chunk))
        return ids

    def document_ids(
        self, prompt: str, max_text_tokens: int | None
    ) -> tuple[list[int], int, bool] | SampleFailure:
        """``[BOS, *tokenize_with_images(prompt), EOS]``, ``too_many_tokens`` when longer than ``max_text_tokens``
        (None: no limit) before splicing, else fitted to ``max_length`` (:func:`prepare.fit_ids`): the ids of
        documents here and in training (:mod:`unifilter_core.prepare` holds the shared caption functions).

        Returns:
            (ids, images kept, truncated), or the failure.
        """
        ids = [self.bos_id, *self.tokenize_with_images(prompt), self.eos_id]
        if max_text_tokens is not None and len(ids) > max_text_tokens:
            return SampleFailure(
                Reason.TOO_MANY_TOKENS,
                detail=f"{len(ids)} ids before splicing > max_text_tokens={max_text_tokens}",
                n_tokens=self.spliced_length(ids),
            )
        fitted, n_kept = fit_ids(ids, self.config.max_length, self.config.num_image_tokens)
        return fitted, n_kept, len(fitted) < len(ids)

    def spliced_length(self, input_ids: list[int]) -> int:
        """Length of ``input_ids`` after each sentinel becomes ``num_image_tokens`` vectors."""
        n_images = sum(1 for t in input_ids if t == IMAGE_TOKEN_INDEX)
        return len(input_ids) + n_images * (self.config.num_image_tokens - 1)

    # ----------------------------------------------------------------------------------------------- images
    def too_large(self, image: Image.Image) -> SampleFailure | None:
        """``image_too_large`` when preprocessing ``image`` would cost more than ``max_pixels`` (nothing is
        allocated to find out), else None."""
        limit = self.config.max_pixels
        width, height = image.size
        cost = pixel_cost(width, height, self.config.image_aspect_ratio)
        if limit is None or cost <= limit:
            return None
        how = "padded to a square" if self.config.image_aspect_ratio == AspectMode.PAD.value else "as is"
        return SampleFailure(
            Reason.IMAGE_TOO_LARGE,
            detail=f"{width}x{height} image costs {cost} pixels {how} > max_pixels={limit}",
            n_images=1,
        )

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """RGB -> pad|resize to square -> PIL ``resample`` to ``image_size`` -> x rescale -> (x - mean) / std.

        Returns:
            ``[3, image_size, image_size]`` float32.

        Raises:
            ValueError: the image costs more than ``max_pixels`` (callers check :meth:`too_large` first).
        """
        failure = self.too_large(image)
        if failure is not None:
            raise ValueError(failure.detail)
        config = self.config
        rgb = to_rgb(image)
        if config.image_aspect_ratio == AspectMode.PAD.value:
            rgb = expand_to_square(rgb, config.pad_color)
        size = config.image_size
        resized = rgb.resize((size, size), resample=Image.Resampling(config.resample))
        arr = np.asarray(resized, dtype=np.float32) * np.float32(config.rescale_factor)  # (H, W, 3)
        arr = (arr - np.asarray(config.image_mean, np.float32)) / np.asarray(config.image_std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # (3, H, W)

    def _stack(self, images: list[Image.Image]) -> torch.Tensor | None:
        return torch.stack([self.preprocess_image(im) for im in images]) if images else None

    # ----------------------------------------------------------------------------------------------- caption
    def prepare_caption(
        self, image: Image.Image | bytes | None, text: str | None
    ) -> PreparedSample | SampleFailure:
        """Format one image-caption pair: ``[BOS, -200, tokens("\\n" + caption)..., EOS]``.

        A literal ``<image>`` in the caption becomes ``image``. The ids are cut to ``caption_max_tokens`` and the
        spliced length to ``max_length``, EOS kept in both cases (``truncated=True``).
        """
        if image is None:
            return SampleFailure(Reason.MISSING_IMAGE, detail="caption sample has no image")
        if text is None:
            return SampleFailure(Reason.MISSING_TEXT, detail="caption sample has no text", n_images=1)
        if not isinstance(text, str):
            raise ValueError(f"caption text must be a str, got {type(text).__name__}")
        decoded = decode_image(image)
        if isinstance(decoded, SampleFailure):
            return decoded
        too_large = self.too_large(decoded)
        if too_large is not None:
            return too_large
        ids, truncated = caption_ids(self, text, self.config.caption_max_tokens)
        try:
            pixels = self._stack([decoded])
        except (OSError, ValueError) as exc:
            return SampleFailure(Reason.IMAGE_DECODE_ERROR, detail=f"{type(exc).__name__}: {exc}")
        return PreparedSample(ids, pixels, n_images=1, n_tokens=self.spliced_length(ids), truncated=truncated)

    # ----------------------------------------------------------------------------------------------- document
    def prepare_document(
        self, texts: list[str | None], images: list[Image.Image | bytes | None]
    ) -> PreparedSample | SampleFailure:
        """Format one interleaved document (OBELICS style: parallel ``texts`` / ``images`` slot lists).

        Text slots keep their text (``<image>`` inside becomes ``<image-placeholder>``), image slots become
        ``<image>``; slots joined with ``"\\n\\n"``, then ``BOS ... EOS``, then cut to ``max_length`` keeping EOS
        and never cutting an image's tokens in half (a partially fitting image is dropped with its sentinel).

        Dropped without failing the document (as the original does), and listed in ``PreparedSample.detail``:
        images of width or height 1 and undecodable images (with their slot), and slots holding neither text nor
        image. Decision: one bad image does not cost the whole document its score; the note makes it visible.

        Returns:
            A :class:`PreparedSample`, or a :class:`SampleFailure` with ``too_many_images`` /
            ``too_many_tokens`` (limits of :class:`ProcessingConfig`) or ``empty_document`` (no image and no
            non-blank text left).

        Raises:
            ValueError: ``texts`` and ``images`` differ in length, or a slot holds both a text and an image.
        """
        parts = self._collect_slots(texts, images)
        notes = "; ".join(parts.notes) or None
        n_images = len(parts.images)
        if not parts.images and not parts.has_text:
            return SampleFailure(
                Reason.EMPTY_DOCUMENT, detail=notes or "document has no text and no usable image"
            )
        limit = self.config.max_images
        if limit is not None and n_images > limit:
            return SampleFailure(
                Reason.TOO_MANY_IMAGES, detail=f"{n_images} images > max_images={limit}", n_images=n_images
            )
        built = self.document_ids(DOC_SLOT_SEPARATOR.join(parts.slots), self.config.max_text_tokens)
        if isinstance(built, SampleFailure):
            built.n_images = n_images
            return built
        fitted, n_kept, truncated = built
        try:
            pixels = self._stack(parts.images[:n_kept])
        except (OSError, ValueError) as exc:
            return SampleFailure(
                Reason.IMAGE_DECODE_ERROR, detail=f"{type(exc).__name__}: {exc}", n_images=n_images
            )
        return PreparedSample(fitted, pixels, n_kept, self.spliced_length(fitted), truncated, notes)

    def _collect_slots(
        self, texts: list[str | None], images: list[Image.Image | bytes | None]
    ) -> _DocumentParts:
        """Validate the slot lists, decode images and build the slot strings (``<image>`` for each image kept)."""
        if len(texts) != len(images):
            raise ValueError(
                f"texts has {len(texts)} slots but images has {len(images)}; they must be parallel lists with "
                "None at the other list's slots"
            )
        parts = _DocumentParts()
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            if text is not None and image is not None:
                raise ValueError(f"slot {i} holds both a text and an image; each slot holds one of them")
            if text is not None:
                if not isinstance(text, str):
                    raise ValueError(f"texts[{i}] must be a str or None, got {type(text).__name__}")
                parts.slots.append(text.replace(IMAGE_TOKEN, IMAGE_PLACEHOLDER))
                parts.has_text = parts.has_text or bool(text.strip())
            elif image is None:
                parts.notes.append(f"slot {i}: empty slot dropped")
            else:
                decoded = decode_image(image)
                if isinstance(decoded, SampleFailure):
                    parts.notes.append(f"slot {i}: image dropped ({decoded.reason.value}: {decoded.detail})")
                elif decoded.width == 1 or decoded.height == 1:
                    parts.notes.append(f"slot {i}: {decoded.width}x{decoded.height} image dropped")
                elif (too_large := self.too_large(decoded)) is not None:
                    parts.notes.append(
                        f"slot {i}: image dropped ({too_large.reason.value}: {too_large.detail})"
                    )
                else:
                    parts.slots.append(IMAGE_TOKEN)
                    parts.images.append(decoded)
        return parts
