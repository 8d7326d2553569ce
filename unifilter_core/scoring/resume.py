"""Resume before loading anything: is a tar's table already what this request would write?

:func:`~unifilter_core.scoring.engine.score_tar` decides "up to date" from the tar's sha256, the model's
fingerprint and the config hash, which needs the model loaded and the tar read. A run that only finds its table
done (the common case of a backfill rerun) should pay for neither. So the manifest also records a **request key**:
a hash of everything the request names, taken from file metadata only:

* the tar (path as given, size, modification time in ns; a store object: its URL, ETag and size);
* every file directly in the checkpoint folder (and in a separate vision-tower folder): name, size, mtime;
* the scorer settings that can change the scores (device, dtype, aspect, tower, packing, compile, ...);
* the sample kind, reader limits, table format and version, and the package version.

When a later request has the same key, the table is up to date: the same files with the same sizes and times,
read with the same settings, give the same table (the ``make``/``rsync`` rule). Any difference, even a
``touch``, only sends the run down the full path, which rescores the tar or, when its content is unchanged,
resumes after hashing it and records the new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import unifilter_core
from unifilter_core import storage
from unifilter_core.scoring.config import (
    SCORE_TABLE_VERSION,
    OutputFormat,
    SampleKind,
    ScoringConfig,
    as_plain,
)
from unifilter_core.scoring.table import manifest_path_for, read_manifest

REQUEST_KEY_VERSION = 1


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _folder_stats(folder: Path) -> dict[str, list[Any]]:
    """``{name: [size, mtime_ns]}`` of the regular files directly in ``folder`` (hidden files left out)."""
    return {
        entry.name: _stat(entry)
        for entry in sorted(folder.iterdir())
        if entry.is_file() and not entry.name.startswith(".")
    }


def request_key(
    *,
    tar: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    kind: SampleKind | str,
    settings: dict[str, Any],
    config: ScoringConfig,
    extra_dirs: Iterable[str | os.PathLike[str]] = (),
    output_format: OutputFormat | str = OutputFormat.UNIFILTER,
) -> str:
    """The hex request key of scoring ``tar`` with ``checkpoint`` and ``settings`` (stats only, no reads).

    Args:
        tar: the shard (its name is kept as given: a symlinked shard is its own request).
        checkpoint: the resolved checkpoint folder.
        kind: the sample kind.
        settings: the scorer settings that can change scores (JSON-serialisable values).
        config: the engine options (only ``reader_limits`` counts, as in the config hash).
        extra_dirs: more folders whose files count (a separate vision tower).
        output_format: the table format.

    Raises:
        OSError: the tar or a folder cannot be stat'ed (then there is nothing to resume).
    """
    if storage.is_url(tar):
        tar_entry = [str(tar), storage.object_fingerprint(tar) or storage.size_of(tar)]
    else:
        tar_path = Path(os.path.abspath(tar))
        tar_entry = [str(tar_path), *_stat(tar_path)]
    doc = {
        "version": REQUEST_KEY_VERSION,
        "code_version": unifilter_core.__version__,
        "table_version": SCORE_TABLE_VERSION,
        "format": str(OutputFormat(output_format)),
        "kind": str(SampleKind(kind)),
        "tar": tar_entry,
        "checkpoint": [str(Path(checkpoint)), _folder_stats(Path(checkpoint))],
        "extra": [[str(Path(d)), _folder_stats(Path(d))] for d in extra_dirs if Path(d).is_dir()],
        "settings": settings,
        "reader_limits": as_plain(config.reader_limits),
    }
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def resumable_manifest(table: str | os.PathLike[str], key: str) -> dict[str, Any] | None:
    """The manifest of ``table`` when it records request ``key`` and the table is there, complete; else None."""
    parquet = storage.location(table)
    storage.forget_listings(parquet.parent)  # another process may have committed it meanwhile
    if not parquet.is_file():
        return None
    manifest = read_manifest(manifest_path_for(parquet))
    if not manifest or manifest.get("request_key") != key:
        return None
    expected = (manifest.get("table") or {}).get("bytes")
    if expected is not None and expected != parquet.stat().st_size:
        return None
    return manifest
