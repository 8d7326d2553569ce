"""The checks and plots of a ``scores`` materialization (one tar or a group of tars): one row per sample,
scores in range, the score histogram and the status / reason counts."""

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from unifilter_core import storage
from unifilter_dagster.assets._meta import image_md, md_table

ROWS_CHECK = "one_row_per_sample"
RANGE_CHECK = "scores_finite_in_range"
SCORE_RANGE = (-1.0, 4.0)  # the released regression head outputs about 0..3
_SHOWN = 20  # tars named in a check's metadata at most


def merged_stats(stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One tar's statistics as they are, or a group's merged: counts and histogram summed, the mean weighted by
    ok rows; quantiles are per tar only (absent for a group)."""
    if len(stats) == 1:
        return dict(stats[0])
    n_ok = sum(s["n_ok"] for s in stats)
    total = sum((s["mean"] or 0.0) * s["n_ok"] for s in stats)
    reasons: Counter[str] = Counter()
    for s in stats:
        reasons.update(s.get("reasons") or {})
    edges = stats[0]["hist_edges"] if stats else []
    return {
        "n_ok": n_ok,
        "n_skipped": sum(s["n_skipped"] for s in stats),
        "n_error": sum(s["n_error"] for s in stats),
        "mean": total / n_ok if n_ok else None,
        "histogram": [sum(col) for col in zip(*(s["histogram"] for s in stats), strict=True)]
        if stats
        else [],
        "hist_edges": edges,
        "reasons": dict(sorted(reasons.items())),
    }


def score_plots(partition_key: str, stats: Mapping[str, Any]) -> dict[str, dg.MetadataValue]:
    """The score histogram (with rows by status) and the status / reason count tables."""
    from unifilter_core.plots import counts_markdown, score_histogram_png

    by_status = {"ok": stats["n_ok"], "skipped": stats["n_skipped"], "error": stats["n_error"]}
    png = score_histogram_png(stats["histogram"], stats["hist_edges"], by_status, title=partition_key)
    return {
        "score_histogram": image_md(png, f"score histogram of {partition_key}"),
        "status_counts": dg.MetadataValue.md(counts_markdown(by_status)),
        "reason_counts": dg.MetadataValue.md(counts_markdown(stats.get("reasons") or {}, key="reason")),
    }


def _table_rows(table: str) -> int:
    import pyarrow.parquet as pq

    with storage.location(table).open("rb") as handle:
        return pq.ParquetFile(handle).metadata.num_rows


def row_count_check(tables: Sequence[tuple[str, str, Mapping[str, Any]]]) -> dg.AssetCheckResult:
    """Rows of each ``(tar key, table, manifest)`` against the independent listing the engine recorded (a header
    walk that does not share its reader).

    Fails when a sample key of a tar has no row, or when a manifest has no listing to compare with (a table
    written before the listing existed: rescore it).
    """
    rows = samples = missing = 0
    unlisted: list[str] = []
    failing: list[dict[str, Any]] = []
    examples: list[str] = []
    status: Counter[str] = Counter()
    for tar_key, table, manifest in tables:
        n = _table_rows(table)
        rows += n
        status.update((manifest.get("counts") or {}).get("status", {}))
        listing = manifest.get("listing")
        if not isinstance(listing, dict):
            unlisted.append(tar_key)
            continue
        tar_missing, tar_samples = int(listing.get("missing_keys", 0)), int(listing.get("samples", 0))
        missing += tar_missing
        samples += tar_samples
        examples += list(listing.get("missing_examples") or [])[:5]
        if tar_missing or n < tar_samples:
            failing.append({"tar": tar_key, "rows": n, "samples": tar_samples, "missing_keys": tar_missing,
                            "listing_error": str(listing.get("error") or "")})  # fmt: skip
    if unlisted:
        return dg.AssetCheckResult(
            check_name=ROWS_CHECK,
            passed=False,
            metadata={"table_rows": rows, "unlisted_tars": dg.MetadataValue.json(unlisted[:_SHOWN])},
            description="a manifest has no independent listing of its tar; rescore the partition (--force)",
        )
    return dg.AssetCheckResult(
        check_name=ROWS_CHECK,
        passed=not failing,
        metadata={
            "table_rows": rows,
            "tar_samples": samples,
            "missing_keys": missing,
            "missing_examples": dg.MetadataValue.json(examples[:_SHOWN]),
            "failing_tars": md_table(failing[:_SHOWN]),
            **dict(status),
        },
        description="every sample key of the tar(s) (listed independently of the reader) has a row",
    )


def range_check(tables: Sequence[str]) -> dg.AssetCheckResult:
    """Scores of ok rows are finite and within :data:`SCORE_RANGE` (a warning)."""
    import pyarrow.parquet as pq

    ok = bad = 0
    for table in tables:
        with storage.location(table).open("rb") as handle:
            cols = pq.read_table(handle, columns=["score", "status"]).to_pydict()
        scores = [s for s, st in zip(cols["score"], cols["status"], strict=True) if st == "ok"]
        ok += len(scores)
        bad += sum(
            1
            for s in scores
            if s is None or not math.isfinite(s) or not SCORE_RANGE[0] <= s <= SCORE_RANGE[1]
        )
    return dg.AssetCheckResult(
        check_name=RANGE_CHECK,
        passed=not bad,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"ok_rows": ok, "out_of_range": bad, "range": str(SCORE_RANGE)},
        description="scores of ok rows are finite and within the expected range",
    )
