"""What the workbench shows, read from the catalog and the score parquet: per-source score data, status and
reason counts, default thresholds, gallery candidates and a lineage summary.

Score parquet are read with an in-memory DuckDB connection over the catalog's score glob (the same rows
``unifilter thresholds`` sees), so no catalog lock is held while scores are read; catalog tables are read through
:meth:`Catalog.query` (read-only).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import duckdb
import numpy as np

from unifilter_core.catalog import Catalog, ThresholdRow

logger = logging.getLogger(__name__)

_OK = "status = 'ok' AND score IS NOT NULL AND isfinite(score)"
_SAMPLE_COLS = "key, partition_key, uid, url, CAST(score AS DOUBLE) AS score"


@dataclass(slots=True)
class WorkbenchConfig:
    """Options of :func:`~unifilter_core.report.build_workbench`.

    Attributes:
        keep_fraction: the default threshold keeps this share of each source's ok samples (catalog rule).
        samples_per_band: thumbnails in each band (lowest, around the threshold, highest).
        pool_factor: the "around the threshold" band is picked live from ``pool_factor * samples_per_band``
            samples at evenly spaced ranks plus the ones nearest the default threshold.
        thumb_size: longest thumbnail side in pixels.
        jpeg_quality: thumbnail JPEG quality.
        max_text_chars: sample text shown in the gallery is cut to this length.
        max_exact_scores: up to this many ok scores per source are embedded (float32, sorted), so kept counts
            are exact; above it a histogram of ``fine_bins`` bins is embedded and counts are exact only at bin
            edges (the page says which).
        fine_bins: bins of that histogram.
    """

    keep_fraction: float = 0.3
    samples_per_band: int = 6
    pool_factor: int = 6
    thumb_size: int = 128
    jpeg_quality: int = 70
    max_text_chars: int = 300
    max_exact_scores: int = 200_000
    fine_bins: int = 2000

    def validate(self) -> None:
        """Raise ``ValueError`` for out-of-range options."""
        if not 0.0 < self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {self.keep_fraction} (0.3 keeps 30%)")
        if self.samples_per_band < 0:
            raise ValueError(f"samples_per_band must be >= 0, got {self.samples_per_band}")
        if self.thumb_size < 16 or self.pool_factor < 1 or self.fine_bins < 10 or self.max_exact_scores < 0:
            raise ValueError("thumb_size >= 16, pool_factor >= 1, fine_bins >= 10 and max_exact_scores >= 0")


@dataclass(slots=True)
class SampleRef:
    """One gallery candidate: a scored sample and (after :mod:`~unifilter_core.report.gallery`) its preview."""

    key: str
    partition_key: str
    score: float
    uid: str | None = None
    url: str | None = None
    text: str = ""
    thumb: str | None = None  # data: URI of a JPEG thumbnail
    n_images: int = 0
    note: str | None = None  # why there is no preview


@dataclass(slots=True)
class SourceData:
    """Everything the page shows about one source.

    Attributes:
        scores: ``[n_ok]`` sorted float32 scores when ``exact``; else None and ``fine_hist``/``fine_edges`` hold
            a ``[fine_bins]`` histogram over ``[score_min, score_max]``.
        status_counts: rows by status (``ok``, ``skipped``, ``error``).
        reasons: reason code -> rows, over rows whose status is not ok.
        default: the catalog's threshold row for ``keep_fraction`` (None without ok scores).
        bands: ``lowest`` and ``highest`` samples, and the ``pool`` the live middle band is chosen from.
    """

    source: str
    kind: str | None
    n_tars: int
    n_scored_tars: int
    status_counts: dict[str, int]
    reasons: dict[str, int]
    default: ThresholdRow | None
    exact: bool = True
    scores: np.ndarray | None = None
    fine_hist: list[int] = field(default_factory=list)
    fine_edges: list[float] = field(default_factory=list)
    score_min: float | None = None
    score_max: float | None = None
    bands: dict[str, list[SampleRef]] = field(default_factory=dict)

    @property
    def n_ok(self) -> int:
        return self.status_counts.get("ok", 0)


def collect_sources(catalog: Catalog, config: WorkbenchConfig) -> list[SourceData]:
    """Per-source data for every source that has registered tars or score tables, by source name."""
    _, tar_rows = catalog.query(
        "SELECT source, any_value(kind), count(*) FROM tars GROUP BY source ORDER BY source"
    )
    _, scored = catalog.query("SELECT source, count(*) FROM score_stats GROUP BY source")
    tars = {r[0]: (r[1], int(r[2])) for r in tar_rows}
    n_scored = {r[0]: int(r[1]) for r in scored}
    defaults = {
        r.source: r for r in catalog.compute_threshold(keep_fraction=config.keep_fraction, record=False)
    }
    status: dict[str, dict[str, int]] = {}
    reasons: dict[str, dict[str, int]] = {}
    conn = catalog.connect_parquet()
    try:
        files = catalog.score_files().good
        if files:
            conn.read_parquet(files, union_by_name=True).create_view("s")
            for src, st, reason, n in conn.execute(
                "SELECT source, status, reason, count(*) FROM s GROUP BY ALL ORDER BY ALL"
            ).fetchall():
                status.setdefault(src, {})
                status[src][st] = status[src].get(st, 0) + int(n)
                if st != "ok":
                    key = reason or "unknown"
                    reasons.setdefault(src, {})
                    reasons[src][key] = reasons[src].get(key, 0) + int(n)
        out = []
        for source in sorted(set(tars) | set(status)):
            kind, n_tars = tars.get(source, (None, 0))
            data = SourceData(
                source=source,
                kind=kind,
                n_tars=n_tars,
                n_scored_tars=n_scored.get(source, 0),
                status_counts={k: status.get(source, {}).get(k, 0) for k in ("ok", "skipped", "error")},
                reasons=dict(sorted(reasons.get(source, {}).items(), key=lambda kv: (-kv[1], kv[0]))),
                default=defaults.get(source),
            )
            if source in status and _ok_count(conn, source):
                _fill_scores(conn, data, config)
                data.bands = _gallery_candidates(conn, data, config)
            out.append(data)
        return out
    finally:
        conn.close()


def _ok_count(conn: duckdb.DuckDBPyConnection, source: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM s WHERE source = ? AND {_OK}", [source]).fetchone()
    return int(row[0]) if row else 0


def _fill_scores(conn: duckdb.DuckDBPyConnection, data: SourceData, config: WorkbenchConfig) -> None:
    """Sorted float32 scores when few enough, else a fine histogram; plus min and max."""
    lo, hi, n = conn.execute(
        f"SELECT min(score), max(score), count(*) FROM s WHERE source = ? AND {_OK}", [data.source]
    ).fetchone()
    data.score_min, data.score_max = float(lo), float(hi)
    if n <= config.max_exact_scores:
        rows = conn.execute(
            f"SELECT CAST(score AS FLOAT) FROM s WHERE source = ? AND {_OK} ORDER BY score", [data.source]
        ).fetchnumpy()
        data.scores = np.asarray(next(iter(rows.values())), dtype=np.float32)
        data.exact = True
        return
    bins = config.fine_bins
    width = (hi - lo) / bins if hi > lo else 1.0
    hist = [0] * bins
    for b, count in conn.execute(
        f"SELECT least(greatest(floor((score - ?) / ?), 0), ?)::INTEGER AS b, count(*) FROM s "
        f"WHERE source = ? AND {_OK} GROUP BY b",
        [lo, width, bins - 1, data.source],
    ).fetchall():
        hist[int(b)] = int(count)
    data.exact = False
    data.fine_hist = hist
    data.fine_edges = [lo + i * width for i in range(bins + 1)]
    logger.info("%s: %d ok scores > max_exact_scores; embedding a %d-bin histogram", data.source, n, bins)


def _rows(conn: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[SampleRef]:
    return [
        SampleRef(key=r[0], partition_key=r[1], uid=r[2], url=r[3], score=float(r[4]))
        for r in conn.execute(sql, params).fetchall()
    ]


def _gallery_candidates(
    conn: duckdb.DuckDBPyConnection, data: SourceData, config: WorkbenchConfig
) -> dict[str, list[SampleRef]]:
    """The lowest and highest samples, and a pool at evenly spaced ranks plus those nearest the default."""
    n = config.samples_per_band
    if n == 0:
        return {"lowest": [], "highest": [], "pool": []}
    base = f"SELECT {_SAMPLE_COLS} FROM s WHERE source = ? AND {_OK}"
    src = [data.source]
    lowest = _rows(conn, f"{base} ORDER BY score ASC, partition_key, key LIMIT ?", [*src, n])
    highest = _rows(conn, f"{base} ORDER BY score DESC, partition_key, key LIMIT ?", [*src, n])
    total = data.n_ok
    ranks = sorted({int(round(x)) for x in np.linspace(1, total, min(total, config.pool_factor * n))})
    pool = _rows(
        conn,
        f"SELECT {_SAMPLE_COLS} FROM (SELECT *, row_number() OVER (ORDER BY score, partition_key, key) AS rn "
        f"FROM s WHERE source = ? AND {_OK}) WHERE list_contains(?, rn) ORDER BY rn",
        [*src, ranks],
    )
    if data.default is not None and math.isfinite(data.default.threshold):
        t = data.default.threshold
        half = max(1, n // 2)
        pool += _rows(conn, f"{base} AND score < ? ORDER BY score DESC, key LIMIT ?", [*src, t, half])
        pool += _rows(
            conn, f"{base} AND score >= ? ORDER BY score ASC, key LIMIT ?", [*src, t, n - half or 1]
        )
    seen: set[tuple[str, str]] = set()
    unique = []
    for ref in sorted(pool, key=lambda r: (r.score, r.partition_key, r.key)):
        if (ref.partition_key, ref.key) not in seen:
            seen.add((ref.partition_key, ref.key))
            unique.append(ref)
    return {"lowest": lowest, "highest": highest, "pool": unique}


def collect_lineage(catalog: Catalog) -> list[dict[str, Any]]:
    """Per asset (latest materialization of each partition): count, rows, statuses, model fingerprints, last finish."""
    cols, rows = catalog.query(
        """
        SELECT asset_key, count(*) AS materializations, count(partition_key) AS partitions,
               sum(row_count) AS rows, histogram(status) AS statuses,
               string_agg(DISTINCT model_fingerprint, ', ' ORDER BY model_fingerprint) AS model_fingerprints,
               CAST(max(finished_at) AS VARCHAR) AS last_finished
        FROM lineage GROUP BY asset_key ORDER BY asset_key"""
    )
    out = [dict(zip(cols, r, strict=True)) for r in rows]
    for row in out:
        row["statuses"] = ", ".join(f"{k}: {v}" for k, v in sorted(dict(row["statuses"] or {}).items()))
    return out


def tar_index(catalog: Catalog) -> dict[str, tuple[str, str | None]]:
    """partition_key -> (tar path, kind) from the ``tars`` table."""
    _, rows = catalog.query("SELECT partition_key, path, kind FROM tars")
    return {r[0]: (r[1], r[2]) for r in rows}


def collect_drift(catalog: Catalog) -> dict[str, Any]:
    """``score_drift`` per source (tars checked, flagged) and the flagged tars (worst PSI first)."""
    _, per_source = catalog.query(
        "SELECT coalesce(source, ''), count(*), count(*) FILTER (WHERE flagged) FROM score_drift GROUP BY 1 ORDER BY 1"
    )
    _, flagged = catalog.query(
        "SELECT partition_key, reference, psi, ks, ks_pvalue, error_share, reason FROM score_drift "
        "WHERE flagged ORDER BY psi DESC NULLS LAST, partition_key LIMIT 200"
    )
    return {"per_source": [tuple(r) for r in per_source], "flagged": [tuple(r) for r in flagged]}


def collect_calibration(catalog: Catalog) -> dict[str, Any] | None:
    """The calibration report of the model that scored most ok samples (its validation pairs), or None."""
    from unifilter_core.reference import read_reference

    _, rows = catalog.query(
        "SELECT model_fingerprint FROM score_stats WHERE model_fingerprint IS NOT NULL "
        "GROUP BY 1 ORDER BY sum(n_ok) DESC LIMIT 1"
    )
    return read_reference(catalog.root, rows[0][0]) if rows else None
