"""Threshold analysis over the score tables: per source, the score that keeps a fraction (or an absolute cut)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import duckdb

KEEP_FRACTION = "keep_fraction"
ABSOLUTE = "absolute"
EXACT, STATS, AUTO = "exact", "stats", "auto"
METHODS = (AUTO, EXACT, STATS)
#: ``auto`` scans the score tables exactly up to this many tables, and reads the statistics beyond
EXACT_MAX_TABLES = 10_000

# Ok rows with a finite score, optionally restricted to one source and one model fingerprint; every value is a
# bound parameter: (glob, source, source, fingerprint, fingerprint).
_OK_ROWS = """
ok AS (
    SELECT CAST(source AS VARCHAR) AS source, CAST(score AS DOUBLE) AS score,
           CAST(model_fingerprint AS VARCHAR) AS model_fingerprint
    FROM read_parquet(?, union_by_name = true)
    WHERE status = 'ok' AND score IS NOT NULL AND isfinite(score)
      AND (? IS NULL OR source = ?)
      AND (? IS NULL OR model_fingerprint = ?)
)"""

# keep-fraction mode: k = max(1, ceil(keep * n)); the threshold is the k-th highest score of the source.
# Parameters: keep.
_KEEP_SQL = (
    "WITH"
    + _OK_ROWS
    + """,
ranked AS (
    SELECT source, score,
           row_number() OVER (PARTITION BY source ORDER BY score DESC) AS rn,
           greatest(1, ceil(? * count(*) OVER (PARTITION BY source) - 1e-9)) AS k
    FROM ok
),
cut AS (SELECT source, max(score) FILTER (WHERE rn = k) AS threshold FROM ranked GROUP BY source)
SELECT ok.source, any_value(cut.threshold), count(*) FILTER (WHERE ok.score >= cut.threshold), count(*),
       avg(ok.score), min(ok.score), max(ok.score),
       string_agg(DISTINCT ok.model_fingerprint, ',' ORDER BY ok.model_fingerprint)
FROM ok JOIN cut USING (source)
GROUP BY ok.source ORDER BY ok.source
"""
)

# absolute mode. Parameters: threshold, threshold.
_ABS_SQL = (
    "WITH"
    + _OK_ROWS
    + """
SELECT source, ?::DOUBLE, count(*) FILTER (WHERE score >= ?), count(*),
       avg(score), min(score), max(score),
       string_agg(DISTINCT model_fingerprint, ',' ORDER BY model_fingerprint)
FROM ok GROUP BY source ORDER BY source
"""
)


@dataclass(slots=True)
class ThresholdRow:
    """One source's threshold (one row of the ``thresholds`` table).

    Attributes:
        mode: ``keep_fraction`` or ``absolute``.
        keep_fraction: the requested fraction (None in absolute mode).
        threshold: samples with ``score >= threshold`` are kept.
        kept: ok samples of the source at or above the threshold (ties can make it exceed keep * total).
        total: ok samples of the source (skipped and error rows are never kept).
        model_fingerprint: the model fingerprint(s) of the rows seen, comma-joined when several.
        method: ``exact`` (a scan of every ok score) or ``stats`` (the fine histograms recorded at scoring time:
            the threshold is a bin edge, the k-th highest score lies in the bin above it, ``kept`` counts the
            scores at or above the edge exactly).
    """

    source: str
    mode: str
    keep_fraction: float | None
    threshold: float
    kept: int
    total: int
    score_mean: float | None = None
    score_min: float | None = None
    score_max: float | None = None
    model_fingerprint: str | None = None
    scored_at: datetime | None = None
    method: str = EXACT

    @property
    def kept_share(self) -> float:
        """kept / total (0 when total is 0)."""
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``scored_at`` as ISO text, plus ``kept_share``)."""
        d = asdict(self)
        d["scored_at"] = self.scored_at.isoformat() if self.scored_at else None
        d["kept_share"] = self.kept_share
        return d


def validate_selection(keep_fraction: float | None, absolute: float | None) -> tuple[str, float]:
    """Check a threshold request before any work; returns ``(mode, value)``.

    Raises:
        ValueError: both or neither given, keep not in (0, 1], or absolute not a finite number.
    """
    if absolute is not None and keep_fraction is not None:
        raise ValueError("give either keep_fraction or absolute, not both")
    if absolute is not None:
        if (
            isinstance(absolute, bool)
            or not isinstance(absolute, (int, float))
            or not math.isfinite(absolute)
        ):
            raise ValueError(f"absolute threshold must be a finite number, got {absolute!r}")
        return ABSOLUTE, float(absolute)
    if keep_fraction is None:
        raise ValueError("give keep_fraction (e.g. 0.3) or absolute")
    if (
        isinstance(keep_fraction, bool)
        or not isinstance(keep_fraction, (int, float))
        or not math.isfinite(keep_fraction)
        or not 0.0 < keep_fraction <= 1.0
    ):
        raise ValueError(
            f"keep_fraction must be in (0, 1], got {keep_fraction!r} (e.g. 0.3 keeps the best 30%)"
        )
    return KEEP_FRACTION, float(keep_fraction)


def query_thresholds(
    conn: duckdb.DuckDBPyConnection,
    glob: str | list[str],
    mode: str,
    value: float,
    *,
    source: str | None = None,
    model_fingerprint: str | None = None,
) -> list[ThresholdRow]:
    """Per-source thresholds over the score parquet matching ``glob`` or listed (all values bound as parameters)."""
    base = [glob, source, source, model_fingerprint, model_fingerprint]
    if mode == KEEP_FRACTION:
        rows = conn.execute(_KEEP_SQL, [*base, value]).fetchall()
    else:
        rows = conn.execute(_ABS_SQL, [*base, value, value]).fetchall()
    return [
        ThresholdRow(
            source=r[0],
            mode=mode,
            keep_fraction=value if mode == KEEP_FRACTION else None,
            threshold=float(r[1]),
            kept=int(r[2]),
            total=int(r[3]),
            score_mean=r[4],
            score_min=r[5],
            score_max=r[6],
            model_fingerprint=r[7],
        )
        for r in rows
    ]


_HIST = """
WITH h AS (
    SELECT source, bin, sum(n) AS n FROM score_hist
    WHERE (? IS NULL OR source = ?) AND (? IS NULL OR model_fingerprint = ?)
    GROUP BY source, bin
),
c AS (
    SELECT source, bin, n,
           sum(n) OVER (PARTITION BY source ORDER BY bin DESC ROWS UNBOUNDED PRECEDING) AS above,
           sum(n) OVER (PARTITION BY source) AS total
    FROM h
)"""

# keep-fraction: the highest bin whose scores and those above reach k = max(1, ceil(keep * n)). Params: keep.
_HIST_KEEP = (
    _HIST
    + """,
cut AS (
    SELECT source, max(bin) AS bin FROM c
    WHERE above >= greatest(1, ceil(? * total - 1e-9)) GROUP BY source
)
SELECT source, bin, above, total FROM c JOIN cut USING (source, bin) ORDER BY source"""
)

# absolute: the scores in bins whose lower edge is at or above the threshold. Params: lo, width, threshold.
_HIST_ABS = (
    _HIST
    + """
SELECT source, NULL, coalesce(sum(n) FILTER (WHERE ? + bin * ? >= ? - 1e-9), 0), any_value(total)
FROM c GROUP BY source ORDER BY source"""
)

_STATS_SUMMARY = """
SELECT coalesce(source, ''), sum(mean * n_ok) / nullif(sum(n_ok) FILTER (WHERE mean IS NOT NULL), 0),
       min(min), max(max), string_agg(DISTINCT model_fingerprint, ',' ORDER BY model_fingerprint)
FROM score_stats
WHERE (? IS NULL OR source = ?) AND (? IS NULL OR model_fingerprint = ?)
GROUP BY 1"""


def thresholds_from_stats(
    conn: duckdb.DuckDBPyConnection,
    mode: str,
    value: float,
    *,
    lo: float,
    width: float,
    source: str | None = None,
    model_fingerprint: str | None = None,
) -> list[ThresholdRow]:
    """Per-source thresholds from the catalog's fine histograms (``score_hist``), without reading a table.

    Keep-fraction mode: the threshold is the lower edge of the bin holding the k-th highest score (the lowest
    score of the source when that is the first bin), so it is at most one bin width below the exact one, and
    ``kept`` is exactly the number of scores at or above it. Absolute mode counts the bins at or above the
    threshold (exact to one bin).
    """
    base = [source, source, model_fingerprint, model_fingerprint]
    if mode == KEEP_FRACTION:
        rows = conn.execute(_HIST_KEEP, [*base, value]).fetchall()
    else:
        rows = conn.execute(_HIST_ABS, [*base, lo, width, value]).fetchall()
    summary = {r[0]: r[1:] for r in conn.execute(_STATS_SUMMARY, base).fetchall()}
    out = []
    for src, bin_, kept, total in rows:
        mean, low, high, fps = summary.get(src, (None, None, None, None))
        if mode == KEEP_FRACTION:
            threshold = lo + bin_ * width if bin_ > 0 or low is None else min(low, lo)
        else:
            threshold = value
        out.append(
            ThresholdRow(
                source=src, mode=mode, keep_fraction=value if mode == KEEP_FRACTION else None,
                threshold=round(float(threshold), 9), kept=int(kept), total=int(total), score_mean=mean,
                score_min=low, score_max=high, model_fingerprint=fps, method=STATS,
            )
        )  # fmt: skip
    return out


def format_table(rows: list[ThresholdRow]) -> str:
    """A fixed-width text table: source, mode, threshold, kept, total, kept share."""
    header = ("source", "mode", "threshold", "kept", "total", "kept_share")
    body = [
        (r.source, r.mode, f"{r.threshold:.4f}", str(r.kept), str(r.total), f"{r.kept_share:.1%}")
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for b in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths, strict=True))
            )
        )
    return "\n".join(lines)
