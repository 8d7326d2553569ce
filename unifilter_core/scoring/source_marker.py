"""``<scores folder>/.source.json``: which source and input folder a score folder belongs to.

Two input folders with the same name (DataComp's ``<pool>/shards`` layout) would otherwise both write
``scores/shards/00000000.parquet`` and overwrite each other's tables. The first run into a score folder writes
``{"source": ..., "input": <absolute input folder>}``; a later run from another input folder (or under another
source name) is refused before anything is loaded or written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from unifilter_core import storage

MARKER_NAME = ".source.json"


class SourceMismatchError(ValueError):
    """The score folder holds the tables of another input folder or source (message says what to do)."""


def marker_path(out_dir: str | os.PathLike[str]) -> Path:
    return storage.join(out_dir, MARKER_NAME)


def _input_name(input_dir: str | os.PathLike[str]) -> str:
    """The input folder as recorded: resolved when local, the URL as given for a store prefix."""
    return str(input_dir) if storage.is_url(input_dir) else str(Path(input_dir).resolve())


def _read(marker: Path) -> dict[str, str]:
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceMismatchError(
            f"cannot read {marker} ({exc}); if the folder holds only this source's tables, delete the file"
        ) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("input"), str):
        raise SourceMismatchError(
            f"{marker} is not a source marker (expected {{'source', 'input'}}); if the folder holds only "
            "this source's tables, delete the file"
        )
    return doc


def check_source_marker(
    out_dir: str | os.PathLike[str], source: str, input_dir: str | os.PathLike[str], *, hint: str
) -> None:
    """Refuse a score folder that belongs to another input folder or source (no marker yet: accepted).

    Args:
        out_dir: the score folder.
        source: the source name of this run.
        input_dir: the folder the tars come from.
        hint: what the user can change, appended to the message (e.g. ``pass --source NAME or
            --output-dir DIR``).

    Raises:
        SourceMismatchError: the marker names another input folder or source, or cannot be read.
    """
    marker = marker_path(out_dir)
    if not marker.is_file():
        return
    doc = _read(marker)
    here = _input_name(input_dir)
    if doc["input"] != here:
        raise SourceMismatchError(
            f"score folder {out_dir} holds tables of input {doc['input']} (source "
            f"{doc.get('source')!r}), not of {here}: {hint}"
        )
    if doc.get("source") != source:
        raise SourceMismatchError(
            f"score folder {out_dir} holds tables of source {doc.get('source')!r}, not {source!r}: {hint}"
        )


def write_source_marker(
    out_dir: str | os.PathLike[str], source: str, input_dir: str | os.PathLike[str]
) -> None:
    """Write the marker (atomically; one put on a store) when the folder has none; creates the folder."""
    marker = marker_path(out_dir)
    if marker.is_file():
        return
    doc = {"source": source, "input": _input_name(input_dir)}
    storage.write_text(marker, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
