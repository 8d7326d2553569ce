"""The LLaVA-Pretrain caption subset for stage 1, from a real download (JSON + image folder or zip).

The download is ``blip_laion_cc_sbu_558k.json`` (records ``{"id", "image", "conversations": [human "<image>\\n...",
gpt caption]}``) plus its images, as a folder or as the released ``images.zip``. :func:`prepare_llava_subset`
validates every record, draws a deterministic subset and writes it in the same format under the data root
(``pretrain/llava_pretrain/``), so stage 1 reads the world's set and a real one the same way. Rejected records are
listed with a reason in ``rejected.jsonl``; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

from unifilter_core.fileio import atomic_file, atomic_write_bytes

logger = logging.getLogger(__name__)

PRETRAIN_JSON = "blip_laion_cc_sbu_558k.json"


def _record_problem(record: Any) -> str | None:
    """None for a valid LLaVA-Pretrain record, else a reason code."""
    if not isinstance(record, dict):
        return "invalid_fields"
    if not isinstance(record.get("id"), str | int) or not isinstance(record.get("image"), str):
        return "invalid_fields"
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "invalid_fields"
    human, gpt = turns[0], turns[1]
    if not (isinstance(human, dict) and isinstance(gpt, dict)):
        return "invalid_fields"
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        return "invalid_fields"
    if "<image>" not in str(human.get("value", "")):
        return "missing_image"
    if not isinstance(gpt.get("value"), str) or not gpt["value"].strip():
        return "missing_text"
    image = PurePosixPath(record["image"])
    if image.is_absolute() or ".." in image.parts:
        return "unsafe_member_name"
    return None


def _rank(record_id: Any, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{record_id}".encode()).hexdigest()


class _ImageSource:
    """Images by relative path from a folder or a zip (zip members may sit under one top folder)."""

    def __init__(self, images: Path) -> None:
        self.path = images
        self.zip: zipfile.ZipFile | None = None
        self.names: dict[str, str] = {}
        if images.is_file() and zipfile.is_zipfile(images):
            self.zip = zipfile.ZipFile(images)
            for name in self.zip.namelist():
                if not name.endswith("/"):
                    parts = PurePosixPath(name).parts
                    self.names[name] = name
                    if len(parts) > 1:  # "images/00000/x.jpg" also answers "00000/x.jpg"
                        self.names.setdefault(str(PurePosixPath(*parts[1:])), name)
        elif not images.is_dir():
            raise ValueError(f"LLaVA-Pretrain images {images} is neither a folder nor a zip file")

    def exists(self, rel: str) -> bool:
        return rel in self.names if self.zip else (self.path / rel).is_file()

    def copy_to(self, rel: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # atomic, not fsynced: one of many thousands of images, rebuilt by a rerun after a crash
        with atomic_file(dest, mode=0o644, durable=False) as out:
            if self.zip:
                with self.zip.open(self.names[rel]) as src:
                    shutil.copyfileobj(src, out)
            else:
                with open(self.path / rel, "rb") as src:
                    shutil.copyfileobj(src, out)

    def close(self) -> None:
        if self.zip:
            self.zip.close()


def prepare_llava_subset(
    json_path: str | os.PathLike[str],
    images: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Validate a LLaVA-Pretrain download and write a deterministic subset of it under ``out_dir``.

    Args:
        json_path: ``blip_laion_cc_sbu_558k.json`` (or any file of that schema).
        images: the image folder, or the ``images.zip`` of the release.
        out_dir: destination (``<data root>/pretrain/llava_pretrain``): the JSON, ``images/`` and ``rejected.jsonl``.
        subset_size: records to keep (None = every valid record).
        seed: the subset is the ``subset_size`` valid records with the smallest hash of (seed, id).

    Returns:
        Counts: records read, valid, kept, rejected by reason.

    Raises:
        ValueError: missing files, a JSON that is not a list, subset_size < 1: before any work.
    """
    json_path, images, out = Path(json_path), Path(images), Path(out_dir)
    if not json_path.is_file():
        raise ValueError(f"LLaVA-Pretrain JSON {json_path} does not exist")
    if not images.exists():
        raise ValueError(f"LLaVA-Pretrain images {images} do not exist (a folder or images.zip)")
    if subset_size is not None and subset_size < 1:
        raise ValueError(f"subset_size must be >= 1 or None, got {subset_size}")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{json_path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(f"{json_path} must hold a JSON list of records")
    source = _ImageSource(images)
    rejected: list[dict[str, Any]] = []
    valid: list[dict[str, Any]] = []
    try:
        for index, record in enumerate(records):
            reason = _record_problem(record)
            if reason is None and not source.exists(record["image"]):
                reason = "missing_image"
            if reason:
                rid = record.get("id") if isinstance(record, dict) else None
                rejected.append({"index": index, "id": rid, "reason": reason})
            else:
                valid.append(record)
        valid.sort(key=lambda r: _rank(r["id"], seed))
        kept = valid[:subset_size] if subset_size else valid
        kept.sort(key=lambda r: str(r["id"]))
        out.mkdir(parents=True, exist_ok=True)
        for record in kept:
            source.copy_to(record["image"], out / "images" / record["image"])
    finally:
        source.close()
    _write_json(out / PRETRAIN_JSON, kept)
    _write_jsonl(out / "rejected.jsonl", rejected)
    reasons: dict[str, int] = {}
    for r in rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    summary = {"records": len(records), "valid": len(valid), "kept": len(kept), "rejected": reasons}
    logger.info("LLaVA-Pretrain subset: %s", summary)
    return summary


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
