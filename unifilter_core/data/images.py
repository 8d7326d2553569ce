"""Decoding untrusted image bytes into RGB PIL images, with every failure a :class:`SampleFailure`.

Order of checks (so that nothing large is allocated for a hostile file):
1. ``Image.open`` reads only the header. Formats are restricted to :data:`ALLOWED_FORMATS`. PIL's own bomb
   check (``DecompressionBombError``, or ``DecompressionBombWarning`` when warnings are errors) ->
   ``image_too_large``.
2. Declared width x height > ``limits.max_pixels`` -> ``image_too_large`` (skipped), before decoding.
3. JPEG whose file is far too small for its declared size (a lying header: libjpeg would silently fill the
   missing rows with grey) -> ``image_truncated``. A baseline or progressive Huffman JPEG spends at least one bit
   per 8x8 luma block, so a file smaller than ``blocks / 8`` bytes cannot hold the image it declares.
4. ``img.load()``: truncated data -> ``image_truncated``; anything else PIL raises -> ``image_decode_error``.
5. Conversion to RGB (see :func:`to_rgb`). Animated images keep their first frame. EXIF orientation is not
   applied (the original scorer did not apply it either).
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from PIL import Image

from unifilter_core.data.limits import ReaderLimits
from unifilter_core.records import Reason, SampleFailure

logger = logging.getLogger(__name__)

#: Formats PIL may use for untrusted bytes (the formats web-scale image datasets actually contain).
#: (Multi-picture JPEGs from phones open through the JPEG plugin, as format ``MPO``.)
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def decode_image(data: bytes, limits: ReaderLimits | None = None) -> Image.Image | SampleFailure:
    """Decode untrusted image bytes into an ``RGB`` image, or say why not.

    Args:
        data: the encoded image (any of :data:`ALLOWED_FORMATS`).
        limits: pixel limit and alpha handling; defaults if None.

    Returns:
        A loaded PIL image in mode ``RGB``, or a :class:`SampleFailure` (``empty_member``, ``image_too_large``,
        ``image_truncated`` or ``image_decode_error``). Never raises on bad data.
    """
    limits = limits or ReaderLimits()
    if not data:
        return SampleFailure(Reason.EMPTY_MEMBER, "image member has 0 bytes")
    try:
        img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except _BOMB_ERRORS as exc:
        return SampleFailure(Reason.IMAGE_TOO_LARGE, f"PIL decompression-bomb check: {exc}")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...) on hostile headers
        return _failure(exc, "cannot open image")
    width, height = img.size
    if width <= 0 or height <= 0:
        return SampleFailure(Reason.IMAGE_DECODE_ERROR, f"invalid image size {width}x{height}")
    if width * height > limits.max_pixels:
        return SampleFailure(
            Reason.IMAGE_TOO_LARGE,
            f"{width}x{height} = {width * height} pixels > max_pixels={limits.max_pixels}",
        )
    if img.format in ("JPEG", "MPO"):
        min_bytes = math.ceil(width / 8) * math.ceil(height / 8) // 8
        if len(data) < min_bytes:
            return SampleFailure(
                Reason.IMAGE_TRUNCATED,
                f"JPEG declares {width}x{height} but has {len(data)} bytes (< {min_bytes}): lying header",
            )
    try:
        img.seek(0)
        img.load()
        return to_rgb(img, limits.alpha)
    except _BOMB_ERRORS as exc:
        return SampleFailure(Reason.IMAGE_TOO_LARGE, f"PIL decompression-bomb check: {exc}")
    except Exception as exc:  # decoders raise OSError, EOFError, SyntaxError, ValueError, struct.error...
        return _failure(exc, "cannot decode image")


def _failure(exc: Exception, what: str) -> SampleFailure:
    """``image_truncated`` when PIL ran out of data, else ``image_decode_error``."""
    text = str(exc).lower()
    truncated = isinstance(exc, EOFError) or "truncated" in text or "broken data stream" in text
    reason = Reason.IMAGE_TRUNCATED if truncated else Reason.IMAGE_DECODE_ERROR
    return SampleFailure(reason, f"{what}: {type(exc).__name__}: {str(exc)[:200]}")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """Single-channel 16/32-bit integer or float images -> 8-bit ``L``.

    ``I;16*`` and ``I`` are read as 16-bit intensities (0..65535 -> 0..255, rounding); ``F`` is clipped to
    0..255 as is (float images carry no agreed scale).
    """
    arr = np.asarray(img)
    if img.mode == "F":
        out = np.clip(arr, 0.0, 255.0)
    else:
        out = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, alpha: str = "white") -> Image.Image:
    """Convert any PIL mode to ``RGB``.

    - ``I;16``/``I;16B``/``I;16L``/``I``/``F`` (16-bit and float grey): scaled to 8 bits, see
      :func:`_high_bit_depth_to_l`; PIL itself already reduces 16-bit RGB(A) PNGs to 8 bits.
    - ``P``/``PA`` (palette): expanded; palette transparency counts as alpha.
    - ``RGBA``/``LA``/``La``/``RGBa``/palette with transparency: ``alpha="white"`` composites on white,
      ``alpha="drop"`` discards alpha (like ``convert("RGB")``).
    - ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``1``, ``L``: PIL's conversion.

    Args:
        img: a loaded image.
        alpha: ``"white"`` or ``"drop"``.

    Returns:
        A new image in mode ``RGB`` (or ``img`` itself when it is already RGB).
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_bit_depth_to_l(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBa", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        if alpha == "drop":
            return img.convert("RGB")
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img
