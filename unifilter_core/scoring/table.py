"""The score table (one parquet per tar), its atomic writer and its manifest sidecar.

Layout in an output folder, for the tar ``00000042.tar``::

    00000042.parquet          the score table (design.md "Score table"), one row per sample in tar order
    00000042.manifest.json    what produced it: tar fingerprint, model fingerprint, scoring config (+ hash), counts

Both files are written to a temporary name in the same folder, fsynced and renamed into place, parquet first and
manifest last: a table counts as complete only when its manifest exists and names the same inputs, so a crash at
any point leaves either the previous complete pair, or a pair whose manifest does not match (rescored next run),
or only temporary files (removed by :func:`clean_stale_temp_files`, only while holding the table's lock:
:func:`table_lock`, a hidden ``.<stem>.lock`` that serialises runs scoring the same tar into the same folder).

Columns: :data:`SCORE_TABLE_SCHEMA`; ``flags``, ``quality_class`` and ``expected_level`` were appended last, so
readers that select the older columns keep working. The writer is the last line of defence for text: every
string value passes through :func:`~unifilter_core.data.text.escape_unencodable` (pyarrow never raises on a lone
surrogate), and a key/uid/url escaped here gets its ``*_escaped`` flag. Disk-full, read-only and permission
errors while writing raise :class:`~unifilter_core.scoring.output.OutputError` and leave no temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unifilter_core import storage
from unifilter_core.data.text import escape_unencodable
from unifilter_core.data.writer import exclusive_lock
from unifilter_core.fileio import commit_temp
from unifilter_core.records import Flag, ScoreResult
from unifilter_core.scoring.output import output_errors

logger = logging.getLogger(__name__)

MANIFEST_FORMAT_VERSION = 1
TMP_MARKER = ".tmp-"  # temporary files are ``.<final name>.tmp-<pid>-<random>``

SCORE_TABLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("partition_key", pa.string(), nullable=False),
        pa.field("uid", pa.string()),
        pa.field("url", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("n_images", pa.int32(), nullable=False),
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("truncated", pa.bool_(), nullable=False),
        pa.field("model_fingerprint", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        # appended later (readers that select the columns above keep working)
        pa.field("flags", pa.string()),
        pa.field("quality_class", pa.int32()),
        pa.field("expected_level", pa.float32()),
    ]
)
SCORE_TABLE_COLUMNS: tuple[str, ...] = tuple(SCORE_TABLE_SCHEMA.names)


@dataclass(slots=True)
class ScoreRow:
    """One sample's row before the per-table constant columns are added.

    Attributes:
        key: the sample's ``__key__`` in the tar.
        uid: ``uid`` from the sample json when present.
        url: ``url`` from the sample json when present.
        result: the outcome (score or failure reason).
        flags: :class:`~unifilter_core.records.Flag` codes of the sample (merged with ``result.flags``).
        meta: the sample json (caption tars), written only by the original-form table.
    """

    key: str
    uid: str | None
    url: str | None
    result: ScoreResult
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] | None = None


def _safe(value: str | None) -> str | None:
    """A string pyarrow can always write (lone surrogates escaped), the last line of defence."""
    return None if value is None else escape_unencodable(str(value))[0]


def _row_fields(row: ScoreRow) -> tuple[str, str | None, str | None, str | None]:
    """``(key, uid, url, flags)`` of a row, escaped; escaping a key/uid/url adds its flag."""
    flags = {str(f) for f in (*row.flags, *row.result.flags)}
    values = []
    for value, flag in (
        (row.key, Flag.KEY_ESCAPED),
        (row.uid, Flag.UID_ESCAPED),
        (row.url, Flag.URL_ESCAPED),
    ):
        if value is None:
            values.append(None)
            continue
        text, changed = escape_unencodable(str(value))
        if changed:
            flags.add(str(flag))
        values.append(text)
    joined = ",".join(sorted(_safe(f) or "" for f in flags)) or None
    return values[0] or "", values[1], values[2], joined


def table_paths(out_dir: str | os.PathLike[str], tar_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<out_dir>/<stem>.parquet, <out_dir>/<stem>.manifest.json)`` for a tar ``<stem>.tar``."""
    stem = storage.location(tar_path).name.split(".")[0]
    out = storage.location(out_dir)
    return out / f"{stem}.parquet", out / f"{stem}.manifest.json"


def manifest_path_for(parquet_path: str | os.PathLike[str]) -> Path:
    """The manifest sidecar of a score table: ``00000042.parquet`` -> ``00000042.manifest.json``."""
    path = storage.location(parquet_path)
    return path.with_name(path.name.split(".")[0] + ".manifest.json")


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")


# fsync the temporary file, rename it over the final one, fsync the folder (a module global: tests patch it)
_commit = commit_temp


def lock_path_for(parquet_path: str | os.PathLike[str]) -> Path:
    """The hidden lock file of a score table: ``00000042.parquet`` -> ``.00000042.lock`` (same folder)."""
    path = Path(parquet_path)
    return path.with_name(f".{path.name.split('.')[0]}.lock")


@contextlib.contextmanager
def table_lock(parquet_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the table's lock file for the block: one run at a time scores one table.

    A second run on the same table (the CLI twice, two Dagster runs of one partition) waits here, logging
    "waiting for another run scoring <table>". See :func:`unifilter_core.data.writer.exclusive_lock`.

    Raises:
        OutputError: the lock file cannot be created (read-only folder, permissions, disk full).
    """
    path = Path(parquet_path)
    lock = lock_path_for(path)
    with contextlib.ExitStack() as stack:
        with output_errors(lock):  # only the lock's own errors: an unreadable tar is not an output error
            stack.enter_context(exclusive_lock(lock, f"another run scoring {path}"))
        yield


def clean_stale_temp_files(out_dir: str | os.PathLike[str], stem: str | None = None) -> list[Path]:
    """Delete temporary files left by crashed writers (all of them, or only those of tar ``stem``).

    Only names this module creates (``.<stem>.parquet.tmp-*`` / ``.<stem>.manifest.json.tmp-*``) are touched.
    Call it for one ``stem`` only while holding :func:`table_lock` of that table: a run scoring the same tar
    into the same folder holds the lock for as long as its temporary files live.

    Returns:
        The deleted paths.
    """
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    pattern = f".{stem}.*{TMP_MARKER}*" if stem is not None else f".*{TMP_MARKER}*"
    removed = []
    for path in folder.glob(pattern):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
            logger.info("removed stale temporary file %s", path)
    return removed


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


class ScoreTableWriter:
    """Streams score rows into ``final_path`` through a temporary parquet file; nothing is visible until commit.

    Rows are buffered and written as parquet row groups of ``row_group_size`` rows, so memory stays bounded by
    one row group whatever the tar size. Use as a context manager: leaving the block with an exception (or without
    :meth:`commit`) deletes the temporary file and leaves any previous table untouched.

    Args:
        final_path: ``<out_dir>/<stem>.parquet``.
        source: value of the ``source`` column.
        partition_key: value of the ``partition_key`` column.
        model_fingerprint: value of the ``model_fingerprint`` column.
        metadata: extra key/values stored in the parquet footer (e.g. the tar fingerprint and config hash).
        row_group_size: rows per parquet row group.
    """

    def __init__(
        self,
        final_path: str | os.PathLike[str],
        *,
        source: str,
        partition_key: str,
        model_fingerprint: str,
        metadata: dict[str, str] | None = None,
        row_group_size: int = 8192,
    ) -> None:
        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.final_path = Path(final_path)
        self.tmp_path = _temp_name(self.final_path)
        self._constants = {
            "source": _safe(source),
            "partition_key": _safe(partition_key),
            "model_fingerprint": _safe(model_fingerprint),
        }
        schema = SCORE_TABLE_SCHEMA.with_metadata(
            {f"unifilter.{k}": _safe(v) or "" for k, v in (metadata or {}).items()}
        )
        self._schema = schema
        try:
            with output_errors(self.final_path):
                self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
                    self.tmp_path, schema, compression="zstd"
                )
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        self._buffer: list[ScoreRow] = []
        self._row_group_size = row_group_size
        self.rows_written = 0

    def __enter__(self) -> ScoreTableWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._writer is not None or self.tmp_path.exists():
            self.abort()

    def write(self, rows: Iterable[ScoreRow]) -> None:
        """Append rows (in tar order); full row groups are flushed to disk."""
        self._buffer.extend(rows)
        while len(self._buffer) >= self._row_group_size:
            self._flush(self._buffer[: self._row_group_size])
            del self._buffer[: self._row_group_size]

    def _flush(self, rows: list[ScoreRow]) -> None:
        if not rows:
            return
        if self._writer is None:
            raise RuntimeError("ScoreTableWriter is closed")
        n = len(rows)
        ids = [_row_fields(r) for r in rows]
        columns: dict[str, list[Any]] = {
            "key": [i[0] for i in ids],
            "uid": [i[1] for i in ids],
            "url": [i[2] for i in ids],
            "score": [r.result.score for r in rows],
            "status": [str(r.result.status) for r in rows],
            "reason": [None if r.result.reason is None else str(r.result.reason) for r in rows],
            "n_images": [int(r.result.n_images) for r in rows],
            "n_tokens": [int(r.result.n_tokens) for r in rows],
            "truncated": [bool(r.result.truncated) for r in rows],
            "detail": [_safe(r.result.detail) for r in rows],
            "flags": [i[3] for i in ids],
            "quality_class": [_opt_int(r.result.quality_class) for r in rows],
            "expected_level": [_opt_float(r.result.expected_level) for r in rows],
        }
        for name, value in self._constants.items():
            columns[name] = [value] * n
        table = pa.Table.from_pydict(
            {name: columns[name] for name in SCORE_TABLE_COLUMNS}, schema=self._schema
        )
        with output_errors(self.final_path):
            self._writer.write_table(table)
        self.rows_written += n

    def commit(self) -> int:
        """Flush, close, fsync and atomically rename into place. Returns the number of rows written."""
        self._flush(self._buffer)
        self._buffer.clear()
        assert self._writer is not None, "commit() called twice"
        with output_errors(self.final_path):
            self._writer.close()
            self._writer = None
            _commit(self.tmp_path, self.final_path)
        return self.rows_written

    def abort(self) -> None:
        """Drop everything written so far (the temporary file); the final path is not touched."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        self._buffer.clear()
        self.tmp_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------- manifest
def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the input of :func:`config_hash`."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def config_hash(config: dict[str, Any]) -> str:
    """``sha256:<hex>`` of a canonical config dict."""
    return "sha256:" + hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


@dataclass(slots=True)
class ManifestKey:
    """What a score table was computed from; a table is reused only when all three match."""

    tar_fingerprint: str
    model_fingerprint: str
    config_hash: str

    def matches(self, manifest: dict[str, Any] | None) -> bool:
        if not manifest:
            return False
        return (
            manifest.get("format_version") == MANIFEST_FORMAT_VERSION
            and manifest.get("tar", {}).get("fingerprint") == self.tar_fingerprint
            and manifest.get("model_fingerprint") == self.model_fingerprint
            and manifest.get("config_hash") == self.config_hash
        )


@dataclass(slots=True)
class Counts:
    """Row counts by status and by reason code, and the ok rows' scores (the table's statistics)."""

    by_status: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    ok_scores: list[float] = field(default_factory=list)

    def add(self, result: ScoreResult) -> None:
        status = str(result.status)
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == "ok" and result.score is not None:
            self.ok_scores.append(result.score)
        if result.reason is not None:
            reason = str(result.reason)
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_status.values())


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest at ``path``, or None when it is missing or unreadable (then the tar is rescored)."""
    try:
        data = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable manifest %s (%s); the tar will be rescored", path, exc)
        return None
    return data if isinstance(data, dict) else None


def write_manifest(path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Write a manifest atomically (pretty-printed JSON, sorted keys) through a ``.tmp-`` temporary file (on a
    store: one put, which is atomic per object)."""
    if storage.is_url(path):
        storage.write_text(path, json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return
    final = Path(path)
    tmp = _temp_name(final)
    try:
        with output_errors(final):
            tmp.write_text(
                json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
            )
            _commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_complete(parquet_path: str | os.PathLike[str], key: ManifestKey) -> bool:
    """True when the table and its manifest both exist and the manifest names the same inputs (and, when it
    records one, the table's byte count: a manifest never vouches for other data). Local or on a store."""
    parquet = storage.location(parquet_path)
    storage.forget_listings(parquet.parent)  # another process may have committed (or replaced) it meanwhile
    if not parquet.is_file():
        return False
    manifest = read_manifest(manifest_path_for(parquet))
    if not key.matches(manifest):
        return False
    assert manifest is not None
    expected = manifest.get("table", {}).get("bytes")
    return expected is None or expected == parquet.stat().st_size
