"""Where Claude generation's inputs come from: the world's images, an image folder, a LLaVA-Pretrain download or
OBELICS-style documents (:func:`load_items`), each item with its images' bytes and content hashes."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_TYPES = ("world", "images", "llava", "obelics")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
LLAVA_JSON = "blip_laion_cc_sbu_558k.json"
MAX_DOCUMENT_IMAGES = 20


class MissingWorldImagesError(ValueError):
    """The ``world`` source was asked for before the world's LLaVA-Pretrain set was written."""

    def __init__(self, json_path: Path) -> None:
        super().__init__(f"the world's images are not there ({json_path})")
        self.json_path = json_path


@dataclass(slots=True)
class ImageRef:
    """One source image: its bytes in memory (OBELICS base64) or a file read when needed."""

    ref: str  # where it came from, for people (a path, or ``file.json#doc/slot``)
    path: Path | None = None
    data: bytes | None = None
    _sha: str | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise OSError(f"{self.ref}: no image data")
        return self.path.read_bytes()

    def sha256(self) -> str:
        """SHA-256 of the bytes (of the reference when unreadable: the request then fails as undecodable)."""
        if self._sha is None:
            try:
                self._sha = hashlib.sha256(self.read()).hexdigest()
            except OSError:
                self._sha = "unreadable-" + hashlib.sha256(self.ref.encode()).hexdigest()
        return self._sha

    def stored_name(self, data: bytes) -> str:
        """File name under ``images/``: content hash + an extension sniffed from the bytes."""
        return hashlib.sha256(data).hexdigest()[:24] + _sniff_suffix(data, self.ref)


@dataclass(slots=True)
class SourceItem:
    """What one request is about: one image (caption) or an ordered image set (document)."""

    ref: str
    images: list[ImageRef]

    def image_hashes(self) -> list[str]:
        return [image.sha256() for image in self.images]


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """Where source images come from: ``world`` (the world's LLaVA-Pretrain set under the data root),
    ``images`` (a folder, recursively), ``llava`` (a LLaVA-Pretrain JSON + image folder) or ``obelics``
    (a folder of OBELICS-style ``.json``/``.jsonl`` documents with base64 images)."""

    type: str
    path: Path | None = None
    image_folder: Path | None = None  # llava only; default: ``images/`` next to the JSON, else its folder

    def __post_init__(self) -> None:
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source type must be one of {SOURCE_TYPES}, got {self.type!r}")
        if self.type != "world" and self.path is None:
            raise ValueError(f"source {self.type!r} needs a path")


def load_items(
    kind: str,
    spec: SourceSpec,
    *,
    images_per_document: int = 3,
    limit: int | None = None,
    data_root: Path | None = None,
) -> tuple[list[SourceItem], dict[str, int]]:
    """Source items for ``kind``, in a stable order, and counts of what was skipped and why.

    Captions get one item per image; documents are the OBELICS documents themselves, or consecutive groups of
    ``images_per_document`` images from the other sources.
    """
    skipped: dict[str, int] = {}
    if spec.type == "obelics":
        docs = _obelics_documents(_existing(spec.path, "OBELICS folder"), skipped)
        if kind == "caption":
            items = [SourceItem(im.ref, [im]) for doc in docs for im in doc.images]
        else:
            items = docs
    else:
        images = _source_images(spec, data_root)
        if kind == "caption":
            items = [SourceItem(im.ref, [im]) for im in images]
        else:
            n = images_per_document
            items = [SourceItem(images[i].ref, images[i : i + n]) for i in range(0, len(images), n)]
    if limit is not None:
        items = items[:limit]
    for reason, count in skipped.items():
        logger.warning("skipped %d source document(s): %s", count, reason)
    return items, skipped


def _existing(path: Path | None, what: str) -> Path:
    if path is None or not path.exists():
        raise ValueError(f"{what} {path} does not exist")
    return path


def _source_images(spec: SourceSpec, data_root: Path | None) -> list[ImageRef]:
    if spec.type == "images":
        folder = _existing(spec.path, "image folder")
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        return [ImageRef(str(p.relative_to(folder)), path=p) for p in files]
    if spec.type == "world":
        from unifilter_core.paths import data_root as default_root
        from unifilter_core.paths import pretrain_dir

        json_path = pretrain_dir(data_root or default_root()) / LLAVA_JSON
        if not json_path.exists():
            raise MissingWorldImagesError(json_path)
        return _llava_images(json_path, None)
    return _llava_images(_existing(spec.path, "LLaVA-Pretrain JSON"), spec.image_folder)


def _llava_images(json_path: Path, image_folder: Path | None) -> list[ImageRef]:
    records = json.loads(json_path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{json_path} is not a LLaVA-Pretrain JSON list of records")
    folder = image_folder or (
        json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
    )
    root = folder.resolve()
    refs = []
    for record in records:
        name = record.get("image") if isinstance(record, dict) else None
        path = (folder / name).resolve() if isinstance(name, str) else None
        if path is None or not path.is_relative_to(root):
            logger.warning("%s: record %r has no usable image path; skipped", json_path, record)
            continue
        refs.append(ImageRef(name, path=path))
    return refs


def _obelics_documents(folder: Path, skipped: dict[str, int]) -> list[SourceItem]:
    docs = []
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        try:
            raw = (
                [json.loads(x) for x in text.splitlines() if x.strip()]
                if file.suffix == ".jsonl"
                else json.loads(text)
            )
        except json.JSONDecodeError:
            skipped["json_decode_error"] = skipped.get("json_decode_error", 0) + 1
            continue
        for d, doc in enumerate(raw if isinstance(raw, list) else [raw]):
            info = doc.get("image_info") if isinstance(doc, dict) else None
            slots = [x for x in info if isinstance(x, dict)] if isinstance(info, list) else []
            ref = f"{file.relative_to(folder)}#{d}"
            images = [
                ImageRef(f"{ref}/{i}", data=_b64decode(x.get("image_base64"))) for i, x in enumerate(slots)
            ]
            reason = (
                "no_images"
                if not images
                else "too_many_images"
                if len(images) > MAX_DOCUMENT_IMAGES
                else None
            )
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            docs.append(SourceItem(ref, images))
    return docs


def _b64decode(value: Any) -> bytes:
    try:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else b""
    except ValueError:
        return b""


def _sniff_suffix(data: bytes, ref: str) -> str:
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"GIF8"):
        return ".gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    suffix = Path(ref.split("#")[0]).suffix.lower()
    return suffix if suffix in IMAGE_SUFFIXES else ".img"
