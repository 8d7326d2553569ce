"""Per-tar score statistics, computed by DuckDB from one score parquet (no catalog lock needed)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unifilter_core import storage
from unifilter_core.catalog.schema import (
    FINE_BINS,
    FINE_LO,
    FINE_WIDTH,
    HIST_BINS,
    HIST_EDGES,
    HIST_HI,
    HIST_LO,
    attach_store,
)
from unifilter_core.paths import shard_id

logger = logging.getLogger(__name__)

_AGG_SQL = """
SELECT count(*),
       count(*) FILTER (WHERE status = 'ok'),
       count(*) FILTER (WHERE status = 'skipped'),
       count(*) FILTER (WHERE status = 'error'),
       avg(score) FILTER (WHERE status = 'ok'),
       quantile_cont(score, [0.05, 0.25, 0.5, 0.75, 0.95]) FILTER (WHERE status = 'ok'),
       min(score) FILTER (WHERE status = 'ok'),
       max(score) FILTER (WHERE status = 'ok'),
       string_agg(DISTINCT model_fingerprint, ',' ORDER BY model_fingerprint),
       any_value(source)
FROM read_parquet(?)
"""

_HIST_SQL = """
SELECT least(greatest(floor((score - ?) / ?), 0), ?)::INTEGER AS bin, count(*)
FROM read_parquet(?)
WHERE status = 'ok' AND isfinite(score)
GROUP BY bin
"""

_REASONS_SQL = """
SELECT reason, count(*) FROM read_parquet(?)
WHERE reason IS NOT NULL GROUP BY reason ORDER BY reason
"""


@dataclass(slots=True)
class ScoreStats:
    """Summary of one score table (one row of ``score_stats``); quantiles are over ``status = 'ok'`` rows.

    Attributes:
        histogram: counts of ok scores over the fixed bins ``hist_edges`` (len(edges) - 1 bins).
        reasons: reason code -> number of rows with it.
        fine_bins, fine_counts: the non-empty fine bins (``FINE_LO + bin * FINE_WIDTH``, see
            :data:`~unifilter_core.catalog.schema.FINE_WIDTH`) of the ok scores and their counts, ascending;
            thresholds from statistics add them up per source.
    """

    partition_key: str
    source: str | None
    score_path: str
    n_rows: int
    n_ok: int
    n_skipped: int
    n_error: int
    mean: float | None
    p05: float | None
    p25: float | None
    p50: float | None
    p75: float | None
    p95: float | None
    min: float | None
    max: float | None
    histogram: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=lambda: list(HIST_EDGES))
    reasons: dict[str, int] = field(default_factory=dict)
    model_fingerprint: str | None = None
    fine_bins: list[int] = field(default_factory=list)
    fine_counts: list[int] = field(default_factory=list)

    def to_manifest(self) -> dict:
        """The statistics a manifest records (``stats``): everything but the key and the path, which the
        reader knows."""
        d = asdict(self)
        for name in ("partition_key", "score_path", "hist_edges"):
            d.pop(name)
        return d


def stats_from_manifest(doc: dict, partition_key: str, score_path: str) -> ScoreStats | None:
    """The statistics a manifest recorded at scoring time (``stats``), or None when it has none (written
    before they were recorded, or another output format)."""
    recorded = doc.get("stats")
    if not isinstance(recorded, dict) or "fine_bins" not in recorded:
        return None
    try:
        return ScoreStats(partition_key=partition_key, score_path=score_path, **recorded)
    except TypeError:  # fields of another version
        return None


def compute_score_stats(partition_key: str, parquet_path: str | Path) -> ScoreStats:
    """Read one score parquet with DuckDB and summarise it.

    Args:
        partition_key: the tar's partition key (``obelics_0042``).
        parquet_path: the score table; must exist (one file, not a glob).

    Raises:
        FileNotFoundError: the parquet does not exist.
    """
    path = storage.location(parquet_path)
    path = path if storage.is_url(path) else path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"score table {path} does not exist; score the tar first")
    import duckdb  # here: the engine's statistics (stats_from_scores) need no DuckDB

    p = str(path)
    conn = duckdb.connect(":memory:")
    try:
        attach_store(conn, path)
        row = conn.execute(_AGG_SQL, [p]).fetchone()
        assert row is not None
        n_rows, n_ok, n_skip, n_err, mean, qs, mn, mx, fps, source = row
        width = (HIST_HI - HIST_LO) / HIST_BINS
        hist = [0] * HIST_BINS
        for b, n in conn.execute(_HIST_SQL, [HIST_LO, width, HIST_BINS - 1, p]).fetchall():
            hist[int(b)] = int(n)
        fine = sorted(conn.execute(_HIST_SQL, [FINE_LO, FINE_WIDTH, FINE_BINS - 1, p]).fetchall())
        reasons = {str(r): int(n) for r, n in conn.execute(_REASONS_SQL, [p]).fetchall()}
    finally:
        conn.close()
    qs = list(qs) if qs is not None else [None] * 5
    return ScoreStats(
        partition_key=partition_key,
        source=source,
        score_path=p,
        n_rows=int(n_rows),
        n_ok=int(n_ok),
        n_skipped=int(n_skip),
        n_error=int(n_err),
        mean=_finite(mean),
        p05=_finite(qs[0]),
        p25=_finite(qs[1]),
        p50=_finite(qs[2]),
        p75=_finite(qs[3]),
        p95=_finite(qs[4]),
        min=_finite(mn),
        max=_finite(mx),
        histogram=hist,
        reasons=reasons,
        model_fingerprint=fps,
        fine_bins=[int(b) for b, _ in fine],
        fine_counts=[int(n) for _, n in fine],
    )


def fine_histogram(scores: Any) -> tuple[list[int], list[int]]:
    """The sparse fine histogram (bins, counts) of the finite scores: the binning of ``score_stats.fine_bins``
    (the SQL of :func:`compute_score_stats` bins alike)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    bins = np.clip(np.floor((scores - FINE_LO) / FINE_WIDTH), 0, FINE_BINS - 1).astype(np.int64)
    values, counts = np.unique(bins, return_counts=True)
    return values.tolist(), counts.tolist()


def stats_from_scores(
    partition_key: str,
    source: str | None,
    score_path: str,
    ok_scores: Sequence[float],
    by_status: dict[str, int],
    by_reason: dict[str, int],
    model_fingerprint: str | None,
) -> ScoreStats:
    """:func:`compute_score_stats` from what the engine holds in memory after writing a table (the ok rows'
    float32 scores and the row counts), without reading the table back: the same figures (quantiles by linear
    interpolation, the same bins), so a manifest's statistics equal the table's."""
    scores = np.asarray(ok_scores, dtype=np.float32).astype(np.float64)
    finite = scores[np.isfinite(scores)]
    qs: list[float | None] = [None] * 5
    if finite.size:
        qs = [float(q) for q in np.quantile(finite, [0.05, 0.25, 0.5, 0.75, 0.95]).astype(np.float32)]
    width = (HIST_HI - HIST_LO) / HIST_BINS
    coarse = np.clip(np.floor((finite - HIST_LO) / width), 0, HIST_BINS - 1).astype(np.int64)
    fine_bins, fine_counts = fine_histogram(finite)
    return ScoreStats(
        partition_key=partition_key,
        source=source,
        score_path=score_path,
        n_rows=int(sum(by_status.values())),
        n_ok=int(by_status.get("ok", 0)),
        n_skipped=int(by_status.get("skipped", 0)),
        n_error=int(by_status.get("error", 0)),
        mean=_finite(float(finite.mean())) if finite.size else None,
        p05=qs[0],
        p25=qs[1],
        p50=qs[2],
        p75=qs[3],
        p95=qs[4],
        min=float(finite.min()) if finite.size else None,
        max=float(finite.max()) if finite.size else None,
        histogram=np.bincount(coarse, minlength=HIST_BINS).tolist(),
        reasons=dict(sorted(by_reason.items())),
        model_fingerprint=model_fingerprint,
        fine_bins=fine_bins,
        fine_counts=fine_counts,
    )


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def table_identity(parquet_path: str | Path) -> tuple[str | None, str | None]:
    """``(partition_key, source)`` recorded by a score table: its first row, else its manifest sidecar.

    Reads the footer and the two columns of the first row group only. (None, None) when neither records them
    (a table written by hand); the caller then falls back to the folder and file names.
    """
    import pyarrow.parquet as pq

    path = storage.location(parquet_path)
    with path.open("rb") as handle:
        pf = pq.ParquetFile(handle)
        wanted = [c for c in ("partition_key", "source") if c in pf.schema_arrow.names]
        first: dict[str, object] = {}
        if wanted and pf.metadata.num_row_groups and pf.metadata.row_group(0).num_rows:
            first = pf.read_row_group(0, columns=wanted).slice(0, 1).to_pylist()[0]
    key, source = _text(first.get("partition_key")), _text(first.get("source"))
    if key:
        return key, source
    manifest = path.with_name(path.name.split(".")[0] + ".manifest.json")
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        doc = None
    if not isinstance(doc, dict):
        return None, source
    return _text(doc.get("partition_key")), _text(doc.get("source")) or source


def _text(value: object) -> str | None:
    return str(value) if isinstance(value, str) and value else None


def stats_key(parquet_path: str | Path) -> str | None:
    """The partition key to file a score table's stats under.

    The key the table records (:func:`table_identity`), else ``<recorded source or folder name>_<NNNN>`` from
    the file name (tables written by hand); None, with a warning, when the file name has no tar id either.
    """
    path = storage.location(parquet_path)
    key, source = table_identity(path)
    if key:
        return key
    number = shard_id(path.name.split(".")[0] + ".tar")
    if number is None:
        logger.warning(
            "%s records no partition_key and is not named <NNNN>.parquet: left out of score_stats", path
        )
        return None
    return f"{source or path.parent.name}_{number:04d}"


def manifest_of(path: Any) -> Any:
    """The manifest beside a score table (``<stem>.manifest.json``)."""
    return path.with_name(path.name.split(".")[0] + ".manifest.json")


def table_stats(parquet_path: str | Path, partition_key: str | None = None) -> ScoreStats | None:
    """A score table's statistics: those its manifest recorded at scoring time, else computed from the parquet
    (:func:`compute_score_stats`). Filed under ``partition_key``, else the key the manifest records, else
    :func:`stats_key`; None when none is known (a table written by hand, warned)."""
    path = storage.location(parquet_path)
    path = path if storage.is_url(path) else path.resolve()
    try:
        doc = json.loads(manifest_of(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        doc = None
    doc = doc if isinstance(doc, dict) else {}
    key = partition_key or _text(doc.get("partition_key")) or stats_key(path)
    if key is None:
        return None
    recorded = stats_from_manifest(doc, key, str(path))
    return recorded if recorded is not None else compute_score_stats(key, path)


def stats_arrow(stats: Sequence[ScoreStats], updated_at: Any) -> Any:
    """``score_stats`` rows as an Arrow table (one set-based insert instead of a statement per row)."""
    import pyarrow as pa

    rows = [asdict(s) for s in stats]
    columns: dict[str, Any] = {name: [r[name] for r in rows] for name in rows[0] if name != "reasons"}
    types = {"histogram": pa.list_(pa.int64()), "hist_edges": pa.list_(pa.float64()),
             "fine_bins": pa.list_(pa.int32()), "fine_counts": pa.list_(pa.int64())}  # fmt: skip
    arrays = {name: pa.array(values, type=types.get(name)) for name, values in columns.items()}
    arrays["reasons"] = pa.array(
        [list(r["reasons"].items()) for r in rows], type=pa.map_(pa.string(), pa.int64())
    )
    arrays["updated_at"] = pa.array([updated_at] * len(rows), type=pa.timestamp("us"))
    return pa.table(arrays)
