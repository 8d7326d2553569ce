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
DRIFT_CHECK = "score_drift"
CANARY_CHECK = "scorer_canary"
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


def drift_check(
    root: Any, catalog: Any, kind: str, results: Sequence[Any], reference_tars: Sequence[str]
) -> dg.AssetCheckResult:
    """WARN when a tar's scores drifted from the reference or most of its rows failed (``score_drift`` rows)."""
    from unifilter_core.catalog.schema import FINE_LO, FINE_WIDTH
    from unifilter_core.drift import dense
    from unifilter_core.plots import drift_png

    rows = [r.drift for r in results if r.drift is not None]
    flagged = [row for row in rows if row.flagged]
    table = [{"tar": row.partition_key, "psi": row.psi, "ks": row.ks, "ks_pvalue": row.ks_pvalue,
              "error_share": row.error_share, "flagged": row.flagged, "reason": row.reason or ""}
             for row in (flagged or rows)[:_SHOWN]]  # fmt: skip
    metadata: dict[str, Any] = {
        "tars": len(rows),
        "flagged": len(flagged),
        "reference": rows[0].reference if rows else "-",
        "drift": md_table(table),
    }
    worst = max(rows, key=lambda row: (row.flagged, row.psi or 0.0), default=None)
    if worst is not None and worst.n_reference:
        from unifilter_core.drift import reference_for

        result = next(r for r in results if r.tar_key == worst.partition_key)
        ref = reference_for(root, catalog, kind, result.stats.get("model_fingerprint"), reference_tars)
        if ref is not None:
            tar = dense(result.stats.get("fine_bins") or [], result.stats.get("fine_counts") or [])
            png = drift_png(tar, ref[1], FINE_LO, FINE_WIDTH, title=f"{worst.partition_key} against {ref[0]}")
            metadata["distribution"] = image_md(png, f"scores of {worst.partition_key} against the reference")
    return dg.AssetCheckResult(
        check_name=DRIFT_CHECK,
        passed=not flagged,
        severity=dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        description="each tar's score distribution is close to its reference (PSI, KS) and most rows scored",
    )


def canary_check(manifests: Mapping[str, Mapping[str, Any]]) -> dg.AssetCheckResult:
    """The canary results the tables' manifests recorded (the run that scored each tar scored the model's canary
    set first): fails when a scorer moved a canary score past the tolerance. Tables scored without a canary set
    (a checkpoint never validated here, or on Ray) pass with a note."""
    results = {key: m.get("canary") for key, m in manifests.items()}
    checked = {key: c for key, c in results.items() if isinstance(c, dict)}
    failed = sorted(key for key, c in checked.items() if not c.get("passed"))
    diffs = [c["max_abs_diff"] for c in checked.values() if c.get("max_abs_diff") is not None]
    return dg.AssetCheckResult(
        check_name=CANARY_CHECK,
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "tars_checked": len(checked),
            "tars_without_canary": len(results) - len(checked),
            "max_abs_diff": max(diffs) if diffs else "-",
            "tolerance": next(iter(checked.values()))["tolerance"] if checked else "-",
            "failed_tars": dg.MetadataValue.json(failed[:_SHOWN]),
        },
        description="the scorer gave the canary pairs of known level the scores their reference recorded",
    )
