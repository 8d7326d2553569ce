"""How well filtering recovered the good samples, against the embedded world's hidden levels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from unifilter_core import paths


def filtering_quality(root: Path, thresholds: dict[str, float]) -> dict[str, Any]:
    """Precision and recall of the kept set against the world's hidden levels (``world/truth.parquet``).

    A sample is kept when its row is ``ok`` and its score is at or above its source's threshold. Precision is
    the share of kept samples whose true level is >= 2; recall the share of level-3 samples that were kept.
    Samples without a true level (the deliberately broken ones) are left out of both.

    Args:
        root: the data root.
        thresholds: the chosen threshold of each source.

    Returns:
        ``kept_precision``, ``kept_recall``, counts, and the same figures per source.

    Raises:
        ValueError: no truth file (not a world data root) or no score tables.
    """
    truth = root / "world" / "truth.parquet"
    tables = sorted(paths.scores_dir(root, "*").parent.glob("*/*.parquet"))
    if not truth.is_file():
        raise ValueError(f"{truth} not found: filtering quality is measured on the embedded world only")
    if not tables:
        raise ValueError(f"no score tables under {root / 'scores'}")
    con = duckdb.connect(":memory:")
    try:
        con.execute("CREATE TABLE th (source VARCHAR, threshold DOUBLE)")
        con.executemany("INSERT INTO th VALUES (?, ?)", [[s, float(t)] for s, t in thresholds.items()])
        rows = con.execute(
            """
            WITH joined AS (
                SELECT t.source, t.level,
                       (s.status = 'ok' AND s.score >= th.threshold) AS kept
                FROM read_parquet(?) t
                JOIN read_parquet(?, union_by_name = true) s
                  ON s.partition_key = t.partition_key AND s.key = t.key
                JOIN th ON th.source = t.source
                WHERE t.level IS NOT NULL
            )
            SELECT source,
                   count(*) FILTER (WHERE kept) AS kept,
                   count(*) FILTER (WHERE kept AND level >= 2) AS kept_good,
                   count(*) FILTER (WHERE level = 3) AS level3,
                   count(*) FILTER (WHERE kept AND level = 3) AS level3_kept,
                   count(*) AS samples
            FROM joined GROUP BY source ORDER BY source
            """,
            [str(truth), [str(p) for p in tables]],
        ).fetchall()
    finally:
        con.close()
    per_source = {}
    totals = [0, 0, 0, 0, 0]
    for source, *counts in rows:
        per_source[source] = _ratios(*counts)
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
    return {**_ratios(*totals), "by_source": per_source}


def _ratios(kept: int, kept_good: int, level3: int, level3_kept: int, samples: int) -> dict[str, Any]:
    return {
        "kept_precision": kept_good / kept if kept else 0.0,
        "kept_recall": level3_kept / level3 if level3 else 0.0,
        "kept": kept,
        "samples": samples,
        "level3": level3,
    }
