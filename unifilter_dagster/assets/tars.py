"""Tar-level assets: discovery (partition registration), per-tar scores, the threshold, the filtered tars."""

import math
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from unifilter_core import paths, storage
from unifilter_core.partition_steps import (
    choose_thresholds,
    discover_tar_records,
    filter_partition,
    partition_is_resumable,
    resolve_partition,
    resume_partition,
    score_partition,
    score_quantiles_by_source,
)
from unifilter_dagster.assets._meta import (
    CODE_VERSION,
    asset_advice,
    image_md,
    md_table,
    record,
    scalar_metadata,
    timed,
)
from unifilter_dagster.assets.training import stage2_classifier
from unifilter_dagster.partitions import GPU_TAG, TARS_PARTITIONS_NAME, tars_partitions
from unifilter_dagster.resources import ScoringModelResource, UniFilterHome

ROWS_CHECK = "one_row_per_sample"
RANGE_CHECK = "scores_finite_in_range"
SCORE_RANGE = (-1.0, 4.0)  # the released regression head outputs about 0..3


#: partitions added per call: one call with a million keys fails in SQLite ("too many SQL variables")
REGISTER_CHUNK = 10_000


def register_new_partitions(instance: dg.DagsterInstance, keys: list[str]) -> list[str]:
    """Add the keys that are not yet ``tars`` partitions (idempotent, in chunks of :data:`REGISTER_CHUNK`);
    returns the ones added."""
    existing = set(instance.get_dynamic_partitions(TARS_PARTITIONS_NAME))
    new = [k for k in keys if k not in existing]
    for start in range(0, len(new), REGISTER_CHUNK):
        instance.add_dynamic_partitions(TARS_PARTITIONS_NAME, new[start : start + REGISTER_CHUNK])
    return new


def ensure_world_tars(home: UniFilterHome) -> None:
    """With the world backend, write the world's source tars (and hidden levels) when they are missing."""
    if not home.use_world:
        return
    from unifilter_core.synth import write_world_tars

    root = home.root_path
    if not (root / "world" / "truth.parquet").is_file():
        write_world_tars(
            paths.sources_dir(root), home.world.to_world_config(), root / "world" / "truth.parquet"
        )


@dg.asset(group_name="tars", code_version=CODE_VERSION, kinds={"duckdb"})
def tar_manifest(
    context: dg.AssetExecutionContext, home: UniFilterHome, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Discovers the tars under every source, registers them as `tars` partitions and in the catalog."""
    with timed() as timing:
        ensure_world_tars(home)
        tars = discover_tar_records(home.root_path, home.source_specs())
        catalog = home.catalog(duckdb)
        catalog.register_tars(tars)
        new = register_new_partitions(context.instance, [t.partition_key for t in tars])
    record(catalog, context, timing, rows=len(tars))
    by_source: dict[str, int] = {}
    for t in tars:
        by_source[t.source] = by_source.get(t.source, 0) + 1
    return dg.MaterializeResult(
        metadata={
            "tars": len(tars),
            "new_partitions": len(new),
            "by_source": dg.MetadataValue.json(by_source),
            "partitions": dg.MetadataValue.json([t.partition_key for t in tars][:200]),
        }
    )


def _score_plots(partition_key: str, stats: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    """The score histogram (with rows by status) and the status / reason count tables of one tar."""
    from unifilter_core.plots import counts_markdown, score_histogram_png

    by_status = {"ok": stats["n_ok"], "skipped": stats["n_skipped"], "error": stats["n_error"]}
    png = score_histogram_png(stats["histogram"], stats["hist_edges"], by_status, title=partition_key)
    return {
        "score_histogram": image_md(png, f"score histogram of {partition_key}"),
        "status_counts": dg.MetadataValue.md(counts_markdown(by_status)),
        "reason_counts": dg.MetadataValue.md(counts_markdown(stats.get("reasons") or {}, key="reason")),
    }


def _row_count_check(table: str, manifest: dict[str, Any]) -> dg.AssetCheckResult:
    """Rows against the independent listing the engine recorded (a header walk that does not share its reader).

    Fails when a sample key of the tar has no row, or when the manifest has no listing to compare with (a table
    written before the listing existed: rescore it).
    """
    import pyarrow.parquet as pq

    with storage.location(table).open("rb") as handle:
        rows = pq.ParquetFile(handle).metadata.num_rows
    listing = manifest.get("listing")
    if not isinstance(listing, dict):
        return dg.AssetCheckResult(
            check_name=ROWS_CHECK,
            passed=False,
            metadata={"table_rows": rows},
            description="the manifest has no independent listing of the tar; rescore the partition (--force)",
        )
    missing = int(listing.get("missing_keys", 0))
    samples = int(listing.get("samples", 0))
    return dg.AssetCheckResult(
        check_name=ROWS_CHECK,
        passed=missing == 0 and rows >= samples,
        metadata={
            "table_rows": rows,
            "tar_samples": samples,
            "missing_keys": missing,
            "missing_examples": dg.MetadataValue.json(listing.get("missing_examples") or []),
            "listing_error": str(listing.get("error") or ""),
            **(manifest.get("counts") or {}).get("status", {}),
        },
        description="every sample key of the tar (listed independently of the reader) has a row",
    )


def _range_check(table: str) -> dg.AssetCheckResult:
    import pyarrow.parquet as pq

    with storage.location(table).open("rb") as handle:
        cols = pq.read_table(handle, columns=["score", "status"]).to_pydict()
    ok = [s for s, st in zip(cols["score"], cols["status"], strict=True) if st == "ok"]
    bad = [s for s in ok if s is None or not math.isfinite(s) or not SCORE_RANGE[0] <= s <= SCORE_RANGE[1]]
    return dg.AssetCheckResult(
        check_name=RANGE_CHECK,
        passed=not bad,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"ok_rows": len(ok), "out_of_range": len(bad), "range": str(SCORE_RANGE)},
        description="scores of ok rows are finite and within the expected range",
    )


@dg.asset(
    group_name="tars",
    partitions_def=tars_partitions,
    code_version=CODE_VERSION,
    deps=[tar_manifest, stage2_classifier],
    kinds={"pytorch", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(ROWS_CHECK, asset="scores"),
        dg.AssetCheckSpec(RANGE_CHECK, asset="scores"),
    ],
)
def scores(
    context: dg.AssetExecutionContext,
    home: UniFilterHome,
    duckdb: DuckDBResource,
    scoring_model: ScoringModelResource,
) -> dg.MaterializeResult:
    """The score table of one tar: one row per sample (ok, skipped or error, with a reason code).

    An up-to-date table (its manifest records this very request) is answered without loading the model or
    reading the tar; otherwise the tar is scored (or, when only its timestamp changed, resumed after hashing).
    """
    root = home.root_path
    spec, tar = resolve_partition(root, home.source_specs(), context.partition_key)
    # bad options fail here, before the model or the catalog is opened
    settings = scoring_model.settings(spec.kind, context.run.tags.get(GPU_TAG))
    config = settings.scoring_config()
    key = scoring_model.request_key(root, settings, spec.kind, tar, config)
    tables = home.tables_location
    resumable = partition_is_resumable(root, spec, tar, key, tables=tables)
    scorer = None if resumable else scoring_model.load(root, settings)
    catalog = home.catalog(duckdb)  # opened once the checkpoint is known to load
    with timed() as timing:
        result = resume_partition(root, spec, tar, context.partition_key, key, catalog=catalog)
        if result is None:
            scorer = scorer or scoring_model.load(root, settings)  # the table changed meanwhile
            result = score_partition(root, spec, tar, context.partition_key, scorer, config, catalog=catalog,
                                     request_key=key)  # fmt: skip
    summary, stats = result["summary"], result["stats"]
    from unifilter_core.scoring import read_manifest

    manifest = read_manifest(summary.manifest_path) or {}
    fingerprint = manifest.get("model_fingerprint")
    record(catalog, context, timing, rows=summary.rows, model_fingerprint=fingerprint,
           input_fingerprint=(manifest.get("tar") or {}).get("fingerprint"))  # fmt: skip
    stat_view = {k: stats.get(k) for k in ("n_ok", "n_skipped", "n_error", "mean", "p05", "p50", "p95")}
    return dg.MaterializeResult(
        metadata={
            "tar": dg.MetadataValue.path(str(tar)),
            "table": dg.MetadataValue.path(result["table"]),
            "rows": summary.rows,
            "resumed": summary.resumed,
            "samples_per_s": round(summary.samples_per_s, 2),
            "model_fingerprint": str(fingerprint),
            "reasons": dg.MetadataValue.json(summary.by_reason),
            **scalar_metadata(stat_view),
            **_score_plots(context.partition_key, stats),
        },
        check_results=[_row_count_check(result["table"], manifest), _range_check(result["table"])],
    )


class ThresholdSettings(dg.Config):
    """Keep a fraction of each source's ok samples (default 0.3), or everything above an absolute score."""

    keep_fraction: float | None = Field(default=0.3, description="in (0, 1]; ignored when absolute is set")
    absolute: float | None = Field(default=None, description="absolute score threshold")


@dg.asset(group_name="tars", code_version=CODE_VERSION, deps=[scores], kinds={"duckdb"})
def quality_threshold(
    context: dg.AssetExecutionContext, config: ThresholdSettings, home: UniFilterHome, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """One threshold per source from every score table (DuckDB), recorded in the catalog."""
    keep = None if config.absolute is not None else config.keep_fraction
    catalog = home.catalog(duckdb)
    with timed() as timing, asset_advice():
        rows = choose_thresholds(home.root_path, catalog, keep_fraction=keep, absolute=config.absolute)
    record(catalog, context, timing, rows=sum(r.kept for r in rows))
    table = [
        {"source": r.source, "mode": r.mode, "threshold": r.threshold, "kept": r.kept, "total": r.total,
         "kept_share": round(r.kept_share, 4)}
        for r in rows
    ]  # fmt: skip
    from unifilter_core.plots import threshold_cdf_png

    cdf = threshold_cdf_png(
        score_quantiles_by_source(catalog),
        {r.source: r.threshold for r in rows},
        {r.source: r.kept_share for r in rows},
    )
    return dg.MaterializeResult(
        metadata={
            "thresholds": md_table(table),
            "score_cdf": image_md(cdf, "score CDF per source with the threshold"),
            "kept": sum(r.kept for r in rows),
            "total": sum(r.total for r in rows),
            "by_source": dg.MetadataValue.json({r.source: r.to_dict() for r in rows}),
        }
    )


@dg.asset(
    group_name="tars",
    partitions_def=tars_partitions,
    code_version=CODE_VERSION,
    deps=[scores, quality_threshold],
    kinds={"webdataset"},
)
def filtered_dataset(
    context: dg.AssetExecutionContext, home: UniFilterHome, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """The kept samples of one tar as a webdataset tar (original members and keys) plus a manifest."""
    root = home.root_path
    spec, tar = resolve_partition(root, home.source_specs(), context.partition_key)
    with timed() as timing, asset_advice():
        result = filter_partition(root, spec, tar, context.partition_key, tables=home.tables_location)
    record(home.catalog(duckdb), context, timing, rows=result["kept"])
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(result["path"]), **scalar_metadata(result)}
    )
