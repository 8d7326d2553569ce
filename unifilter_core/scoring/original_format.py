"""Score tables in the original scripts' form, for the downstream tools that read them.

The original scorers write ``<NNNNNNNN>_quality_score.parquet`` per tar: one row per sample holding every field of
the sample's json (caption tars; interleaved tars: the ``key``) plus ``quality_score`` (and ``quality_class`` for
heads with 2+ labels). Downstream filtering scripts (e.g. Open-Qwen2VL's UniFilter baseline) read exactly that.
:class:`OriginalTableWriter` writes that form with three additions, so nothing is silently dropped:

- a row for every sample, also those that could not be scored (``quality_score`` null), with our ``key``,
  ``status`` and ``reason`` (a json field called ``status`` or ``reason``, e.g. img2dataset's ``"status":
  "success"``, is kept as ``json_status`` / ``json_reason``);
- ``expected_level`` next to ``quality_class`` for multi-label heads;
- ``flags`` (escaped text, see :class:`~unifilter_core.records.Flag`).

``quality_score`` is float32 (the original saved float16, with many ties). The table is written like ours: a
temporary file in the same folder, fsync, rename, manifest last (``<NNNNNNNN>_quality_score.manifest.json``), so
resume works the same. Json values are stored as they are when a column has one type across the tar; a column
whose values mix types (``"width": 32`` in one sample, ``"32"`` in another) is stored as JSON text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unifilter_core import storage
from unifilter_core.data.text import escape_unencodable

ORIGINAL_SUFFIX = "_quality_score"
#: our columns, after the json fields
OWN_COLUMNS = ("key", "status", "reason", "quality_score", "flags")
_RENAMED = {"status": "json_status", "reason": "json_reason", "quality_score": "json_quality_score"}


def original_table_paths(
    out_dir: str | os.PathLike[str], tar_path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """``(<out>/<NNNNNNNN>_quality_score.parquet, <out>/<NNNNNNNN>_quality_score.manifest.json)`` for a tar.

    ``NNNNNNNN`` is the tar id in 8 digits, as the original names them (``shard_7.tar`` -> ``00000007``); a tar
    name without an id keeps its stem.
    """
    from unifilter_core.paths import base_name, shard_id

    number = shard_id(tar_path)
    base = f"{number:08d}" if number is not None else base_name(tar_path).split(".")[0]
    stem = base + ORIGINAL_SUFFIX
    out = storage.location(out_dir)
    return out / f"{stem}.parquet", out / f"{stem}.manifest.json"


def _clean(value: Any) -> Any:
    """Json values with every string made storable (lone surrogates escaped), recursively."""
    if isinstance(value, str):
        return escape_unencodable(value)[0]
    if isinstance(value, dict):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _column(values: list[Any]) -> pa.Array:
    """One json field's values as an Arrow array; mixed or unstorable types fall back to JSON text."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        text = [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values]
        return pa.array(text, type=pa.string())


class OriginalTableWriter:
    """Collects rows of one tar and writes them in the original form on :meth:`commit`.

    The whole tar is held in memory (one tar's json fields: a few MB for 10k samples), because the columns are the
    union of the samples' json fields. Use as a context manager like ``ScoreTableWriter``; leaving without
    :meth:`commit` writes nothing.

    Args:
        final_path: ``<out_dir>/<NNNNNNNN>_quality_score.parquet``.
        multi_label: add ``quality_class`` and ``expected_level`` (heads with 2+ labels).
        metadata: key/values stored in the parquet footer.
    """

    def __init__(
        self, final_path: str | os.PathLike[str], *, multi_label: bool, metadata: dict[str, str] | None = None
    ) -> None:
        self.final_path = Path(final_path)
        self.multi_label = multi_label
        self.metadata = {f"unifilter.{k}": str(v) for k, v in (metadata or {}).items()}
        self._rows: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def __enter__(self) -> OriginalTableWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._rows.clear()

    def write(self, rows: Iterable[Any]) -> None:
        """Add rows: objects with ``key``, ``result`` (a ScoreResult), ``meta`` (the sample json or None) and
        optionally ``uid``/``url`` (used when there is no json) and ``flags``."""
        for row in rows:
            source = getattr(row, "meta", None)
            if not source:  # a sample whose json could not be read: the ids the reader still found
                source = {k: v for k in ("uid", "url") if (v := getattr(row, k, None)) is not None}
            meta = {_RENAMED.get(k, k): v for k, v in _clean(dict(source)).items()}
            meta.pop("key", None)  # the json's key is the sample key; ours is authoritative
            result = row.result
            flags = {str(f) for f in (*(result.flags or ()), *(getattr(row, "flags", None) or ()))}
            own: dict[str, Any] = {
                "key": escape_unencodable(str(row.key))[0],
                "status": str(result.status),
                "reason": None if result.reason is None else str(result.reason),
                "quality_score": result.score,
                "flags": ",".join(sorted(flags)) or None,
            }
            if self.multi_label:
                own["quality_class"] = result.quality_class
                own["expected_level"] = result.expected_level
            self._rows.append((meta, own))

    def table(self) -> pa.Table:
        """The rows as an Arrow table: json fields in first-seen order, then our columns."""
        fields: dict[str, None] = {}
        for meta, _ in self._rows:
            fields.update(dict.fromkeys(meta))
        columns: dict[str, pa.Array] = {
            name: _column([meta.get(name) for meta, _ in self._rows]) for name in fields
        }
        own_types = {"key": pa.string(), "status": pa.string(), "reason": pa.string(),
                     "quality_score": pa.float32(), "flags": pa.string(),
                     "quality_class": pa.int64(), "expected_level": pa.float32()}  # fmt: skip
        own_names = [*OWN_COLUMNS, *(("quality_class", "expected_level") if self.multi_label else ())]
        for name in own_names:
            columns[name] = pa.array([own[name] for _, own in self._rows], type=own_types[name])
        return pa.table(columns).replace_schema_metadata(self.metadata)

    def commit(self) -> int:
        """Write the table atomically (temp file, fsync, rename); returns the number of rows."""
        from unifilter_core.data.writer import atomic_output

        table = self.table()
        with atomic_output(self.final_path) as handle:
            pq.write_table(table, handle, compression="zstd")
        n = table.num_rows
        self._rows.clear()
        return n
