"""Tar-level assets: discovery (partition registration), per-tar scores, the threshold, the filtered tars."""

from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from unifilter_core import paths
from unifilter_core.partition_groups import (
    filter_partition_tars,
    partition_keys,
    resolve_tars,
    score_partition_tars,
    tars_to_score,
)
from unifilter_core.partition_steps import choose_thresholds, discover_tar_records, score_quantiles_by_source
from unifilter_dagster.assets._meta import (
    CODE_VERSION,
    asset_advice,
    image_md,
    md_table,
    record,
    scalar_metadata,
    timed,
)
from unifilter_dagster.assets.score_checks import (
    CANARY_CHECK,
    DRIFT_CHECK,
    RANGE_CHECK,
    ROWS_CHECK,
    canary_check,
    drift_check,
    merged_stats,
    range_check,
    row_count_check,
    score_plots,
)
from unifilter_dagster.assets.training import stage2_classifier
from unifilter_dagster.partitions import GPU_TAG, TARS_PARTITIONS_NAME, tars_partitions
from unifilter_dagster.resources import ScoringModelResource, UniFilterHome

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
        new = register_new_partitions(context.instance, partition_keys(tars, home.source_specs()))
    record(catalog, context, timing, rows=len(tars))
    by_source: dict[str, int] = {}
    for t in tars:
        by_source[t.source] = by_source.get(t.source, 0) + 1
    return dg.MaterializeResult(
        metadata={
            "tars": len(tars),
            "new_partitions": len(new),
            "by_source": dg.MetadataValue.json(by_source),
            "partitions": dg.MetadataValue.json(partition_keys(tars, home.source_specs())[:200]),
        }
    )


class ScoreChecks(dg.Config):
    """Limits of the ``score_drift`` check (each tar against the model's validation pairs of its kind, or the
    tars ``drift_reference_tars`` names) and of the ``scorer_canary`` check."""

    drift_psi: float = Field(default=0.25, description="PSI above this (with a significant KS) is a shift")
    drift_ks_alpha: float = Field(default=1e-3, description="KS p-value below which a gap is not noise")
    drift_error_share: float = Field(default=0.5, description="share of error/skipped rows that flags a tar")
    drift_reference_tars: list[str] = Field(
        default_factory=list,
        description="tar keys whose pooled scores are the reference (default: validation)",
    )
    canary_tolerance: float = Field(
        default=0.05, description="largest change of a canary pair's score before scorer_canary fails"
    )

    def limits(self) -> Any:
        from unifilter_core.drift import DriftLimits

        return DriftLimits(self.drift_psi, self.drift_ks_alpha, self.drift_error_share)


@dg.asset(
    group_name="tars",
    partitions_def=tars_partitions,
    code_version=CODE_VERSION,
    deps=[tar_manifest, stage2_classifier],
    kinds={"pytorch", "parquet"},
    check_specs=[
        dg.AssetCheckSpec(ROWS_CHECK, asset="scores"),
        dg.AssetCheckSpec(RANGE_CHECK, asset="scores"),
        dg.AssetCheckSpec(DRIFT_CHECK, asset="scores"),
        dg.AssetCheckSpec(CANARY_CHECK, asset="scores"),
    ],
)
def scores(
    context: dg.AssetExecutionContext,
    config: ScoreChecks,
    home: UniFilterHome,
    duckdb: DuckDBResource,
    scoring_model: ScoringModelResource,
) -> dg.MaterializeResult:
    """The score tables of one tar or of a tar group: one row per sample (ok, skipped or error, with a reason).

    Each tar has its own table and manifest. A tar whose table is up to date (its manifest records this very
    request) is answered without loading the model or reading the tar; the others are scored with one model load
    for the whole partition, in this process or on the Ray cluster (``scoring_model.executor``).
    """
    root = home.root_path
    part = resolve_tars(root, home.source_specs(), context.partition_key)
    kind = part.spec.kind
    drift = config.limits()
    # bad options fail here, before the model or the catalog is opened
    settings = scoring_model.settings(kind, context.run.tags.get(GPU_TAG))
    settings_config = settings.scoring_config()
    ray = scoring_model.ray_target(root)
    keys = {k: scoring_model.request_key(root, settings, kind, tar, settings_config) for k, tar in part.tars}
    todo = tars_to_score(root, part, keys, tables=home.tables_location)
    scorer = None
    if ray is None and todo:
        scorer = scoring_model.load(root, settings)  # a checkpoint that does not load fails before any write
    catalog = home.catalog(duckdb)
    with timed() as timing:
        results = score_partition_tars(
            root, part, request_keys=keys, load=lambda: scorer,
            config=settings_config, catalog=catalog, tables=home.tables_location, ray=ray, drift=drift,
            drift_reference=config.drift_reference_tars, canary_tolerance=config.canary_tolerance, todo=todo,
        )  # fmt: skip
    from unifilter_core.scoring import read_manifest

    good = [r for r in results if r.summary.error is None]
    manifests = {r.tar_key: read_manifest(r.summary.manifest_path) or {} for r in good}
    fingerprints = sorted({str(m.get("model_fingerprint")) for m in manifests.values()})
    rows = sum(r.summary.rows for r in results)
    single = manifests.get(context.partition_key, {})
    record(catalog, context, timing, rows=rows, model_fingerprint=",".join(fingerprints) or None,
           input_fingerprint=(single.get("tar") or {}).get("fingerprint"),
           status="success" if len(good) == len(results) else "failure")  # fmt: skip
    failed = [f"{r.tar_key}: {r.summary.error}" for r in results if r.summary.error is not None]
    if failed:  # the tars that scored keep their tables and statistics; a rerun scores only the rest
        raise dg.Failure(
            description=f"{len(failed)} of {len(results)} tar(s) could not be scored: "
            + "; ".join(failed[:5]),
            metadata={"failed_tars": dg.MetadataValue.json(failed[:50]), "scored_tars": len(good)},
        )
    stats = merged_stats([r.stats for r in results if r.stats is not None])
    wall = sum(r.summary.wall_s for r in results)
    stat_view = {k: stats.get(k) for k in ("n_ok", "n_skipped", "n_error", "mean", "p05", "p50", "p95")}
    by_reason: dict[str, int] = {}
    for r in results:
        for reason, n in r.summary.by_reason.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
    return dg.MaterializeResult(
        metadata={
            "tars": len(results),
            "tar": dg.MetadataValue.path(str(part.tars[0][1])) if len(results) == 1 else "-",
            "table": dg.MetadataValue.path(results[0].table) if len(results) == 1 else "-",
            "rows": rows,
            "resumed": all(r.summary.resumed for r in results),  # nothing was scored
            "resumed_tars": sum(r.summary.resumed for r in results),
            "samples_per_s": round(sum(r.summary.rows for r in results if not r.summary.resumed) / wall, 2)
            if wall
            else 0.0,
            "model_fingerprint": ",".join(fingerprints),
            "reasons": dg.MetadataValue.json(by_reason),
            **scalar_metadata(stat_view),
            **score_plots(context.partition_key, stats),
        },
        check_results=[
            row_count_check([(r.tar_key, r.table, manifests[r.tar_key]) for r in good]),
            range_check([r.table for r in good]),
            drift_check(root, catalog, kind, results, config.drift_reference_tars),
            canary_check(manifests),
        ],
    )


class ThresholdSettings(dg.Config):
    """Keep a fraction of each source's ok samples (default 0.3), or everything above an absolute score."""

    keep_fraction: float | None = Field(default=0.3, description="in (0, 1]; ignored when absolute is set")
    absolute: float | None = Field(default=None, description="absolute score threshold")
    method: str = Field(
        default="auto",
        description="exact: scan every score table; stats: the fine histograms recorded at scoring time (exact "
        "to 0.01, seconds at a million tables); auto: exact up to 10,000 tables, stats beyond",
    )


@dg.asset(group_name="tars", code_version=CODE_VERSION, deps=[scores], kinds={"duckdb"})
def quality_threshold(
    context: dg.AssetExecutionContext, config: ThresholdSettings, home: UniFilterHome, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """One threshold per source from every score table (DuckDB), recorded in the catalog."""
    keep = None if config.absolute is not None else config.keep_fraction
    catalog = home.catalog(duckdb)
    with timed() as timing, asset_advice():
        method = catalog.threshold_method(config.method)
        rows = choose_thresholds(
            home.root_path, catalog, keep_fraction=keep, absolute=config.absolute, method=method
        )
    record(catalog, context, timing, rows=sum(r.kept for r in rows))
    table = [
        {"source": r.source, "mode": r.mode, "method": r.method, "threshold": r.threshold, "kept": r.kept,
         "total": r.total, "kept_share": round(r.kept_share, 4)}
        for r in rows
    ]  # fmt: skip
    from unifilter_core.plots import threshold_cdf_png

    cdf = threshold_cdf_png(
        score_quantiles_by_source(catalog, method=method),
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
    """The kept samples of each tar of the partition as a webdataset tar (original members and keys) plus a
    manifest per tar; the source's dataset card (``filtered/<source>/README.md``) is rewritten with them."""
    root = home.root_path
    part = resolve_tars(root, home.source_specs(), context.partition_key)
    catalog = home.catalog(duckdb)
    with timed() as timing, asset_advice():
        results = filter_partition_tars(root, part, tables=home.tables_location)
        from unifilter_core.dataset_card import write_dataset_card

        card = write_dataset_card(root, catalog, part.spec.name, part.spec.kind, tables=home.tables_location)
    kept = sum(r["kept"] for r in results)
    record(catalog, context, timing, rows=kept)
    if len(results) == 1:
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(results[0]["path"]),
                "dataset_card": dg.MetadataValue.path(str(card)),
                **scalar_metadata(results[0]),
            }
        )
    return dg.MaterializeResult(
        metadata={
            "tars": len(results),
            "kept": kept,
            "dropped": sum(r["dropped"] for r in results),
            "unsafe": sum(r["unsafe"] for r in results),
            "threshold": results[0]["threshold"],
            "paths": dg.MetadataValue.json([r["path"] for r in results][:50]),
            "dataset_card": dg.MetadataValue.path(str(card)),
        }
    )
