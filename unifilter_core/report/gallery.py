"""Gallery previews: read the chosen samples back from their source tars and make small JPEG thumbnails.

Each tar is streamed once (:func:`~unifilter_core.data.iter_raw_samples`) and reading stops as soon as every
wanted key was seen. A sample whose tar is missing, unregistered or unreadable, or that no longer decodes, keeps
its score and gets a ``note`` instead of a thumbnail; nothing here raises on bad data.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from unifilter_core.data import (
    IMAGE_EXTS,
    CaptionSample,
    DocumentSample,
    RawSample,
    decode_sample,
    iter_raw_samples,
    to_rgb,
)
from unifilter_core.progress import progress
from unifilter_core.records import SampleFailure
from unifilter_core.report.data import SampleRef, WorkbenchConfig

logger = logging.getLogger(__name__)


def thumbnail_data_uri(image: Image.Image, size: int = 128, quality: int = 70) -> str:
    """A ``data:image/jpeg;base64,...`` URI of ``image`` shrunk to fit ``size`` x ``size`` (aspect kept)."""
    img = to_rgb(image) if image.mode != "RGB" else image.copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _guess_kind(raw: RawSample) -> str:
    return "caption" if any(ext in raw.members for ext in IMAGE_EXTS) else "interleaved"


def _apply(
    ref: SampleRef, sample: CaptionSample | DocumentSample | SampleFailure, config: WorkbenchConfig
) -> None:
    if isinstance(sample, SampleFailure):
        ref.note = f"cannot decode now: {sample.reason}"
        return
    if isinstance(sample, CaptionSample):
        images = [sample.image]
        text = sample.text
    else:
        images = [im for im in sample.images if im is not None]
        text = "\n".join(t for t in sample.texts if t and t.strip())
    ref.n_images = len(images)
    ref.text = text if len(text) <= config.max_text_chars else text[: config.max_text_chars - 1] + "\u2026"
    if images:
        ref.thumb = thumbnail_data_uri(images[0], config.thumb_size, config.jpeg_quality)
    else:
        ref.note = "text only"


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def attach_previews(
    refs: Iterable[SampleRef],
    tars: dict[str, tuple[str, str | None]],
    root: Path,
    config: WorkbenchConfig,
) -> int:
    """Fill ``text``, ``thumb`` and ``n_images`` (or ``note``) of every ref from its tar.

    Args:
        refs: gallery candidates (the same key may appear in several bands; each object is filled).
        tars: partition_key -> (tar path, kind), from the catalog's ``tars`` table.
        root: data root, for relative tar paths.
        config: thumbnail size, quality and text length.

    Returns:
        The number of refs that got a thumbnail.
    """
    wanted: dict[str, dict[str, list[SampleRef]]] = {}
    for ref in refs:
        wanted.setdefault(ref.partition_key, {}).setdefault(ref.key, []).append(ref)
    done = 0
    for pkey in progress(sorted(wanted), desc="gallery", unit="tar"):
        by_key = wanted[pkey]
        if pkey not in tars:
            _note_all(by_key, "tar not registered in the catalog")
            continue
        path, kind = tars[pkey]
        tar = _resolve(path, root)
        if not tar.is_file():
            _note_all(by_key, f"tar missing: {tar.name}")
            continue
        remaining = set(by_key)
        for raw in iter_raw_samples(tar):
            if raw.key not in remaining or raw.failure is not None:
                continue
            remaining.discard(raw.key)
            sample = decode_sample(raw, kind if kind in ("caption", "interleaved") else _guess_kind(raw))
            for ref in by_key[raw.key]:
                _apply(ref, sample, config)
                done += ref.thumb is not None
            if not remaining:
                break
        _note_all({k: by_key[k] for k in remaining}, "sample not found in its tar")
    return done


def _note_all(by_key: dict[str, list[SampleRef]], note: str) -> None:
    for refs in by_key.values():
        for ref in refs:
            ref.note = note
    if by_key:
        logger.warning("gallery: %d sample(s): %s", len(by_key), note)
