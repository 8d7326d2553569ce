"""Automation: the scoring, filtering and training jobs, the new-tar sensor and the stale-partition backfill
schedule."""

from datetime import datetime, timezone

import dagster as dg
from dagster_duckdb import DuckDBResource
from dagster_shared.check import CheckError

from unifilter_core.catalog import TarRecord
from unifilter_core.partition_groups import partition_of
from unifilter_core.partition_steps import discover_tar_records
from unifilter_dagster.assets.tars import filtered_dataset, scores
from unifilter_dagster.assets.training import stage1_projector, stage2_classifier
from unifilter_dagster.partitions import TRAINING_TAG, scoring_run_tags, tars_partitions
from unifilter_dagster.resources import ScoringModelResource, UniFilterHome

# `dagster job backfill -m unifilter_dagster -j score_tars --all` scores every registered tar.
score_tars_job = dg.define_asset_job(
    "score_tars",
    selection=dg.AssetSelection.assets(scores),
    partitions_def=tars_partitions,
    description="Score tar partitions (select partitions, or backfill them all).",
)

filter_tars_job = dg.define_asset_job(
    "filter_tars",
    selection=dg.AssetSelection.assets(filtered_dataset),
    partitions_def=tars_partitions,
    description="Write the filtered tars of partitions (after quality_threshold).",
)


# training saturates the machine: dagster.yaml's tag concurrency limit lets one run with this tag run at a time
train_classifier_job = dg.define_asset_job(
    "train_classifier",
    selection=dg.AssetSelection.assets(stage1_projector, stage2_classifier),
    tags={TRAINING_TAG: "true"},
    description="Train the stage-1 projector and the stage-2 classifier (one training run at a time).",
)


def _run_request(key: str, num_gpus: int, reason: str) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=f"{reason}:{key}",
        partition_key=key,
        asset_selection=[scores.key],
        tags={**scoring_run_tags(key, num_gpus), "unifilter/reason": reason},
    )


#: partitions one sensor tick requests at most (with all their new tars): a first tick over a million new
#: single-tar partitions would outrun the tick's time limit and the reply size limit of Dagster's gRPC
MAX_NEW_PARTITIONS_PER_TICK = 5_000


@dg.sensor(
    job=score_tars_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers tars that appear under the sources (as partitions: tars or tar groups) and requests "
    "the scoring of the partitions that gained tars.",
)
def new_tars_sensor(
    context: dg.SensorEvaluationContext,
    home: UniFilterHome,
    duckdb: DuckDBResource,
    scoring_model: ScoringModelResource,
) -> dg.SensorResult | dg.SkipReason:
    specs = {s.name: s for s in home.source_specs()}
    records = discover_tar_records(home.root_path, list(specs.values()))
    catalog = home.catalog(duckdb)
    known = catalog.tar_keys()
    existing = set(context.instance.get_dynamic_partitions(tars_partitions.name))
    by_partition: dict[str, list[TarRecord]] = {}
    for r in records:  # new: a tar the catalog lacks, or one whose partition Dagster lacks
        key = str(partition_of(r.partition_key, specs))
        if r.partition_key not in known or key not in existing:
            by_partition.setdefault(key, []).append(r)
    if not by_partition:
        return dg.SkipReason(f"no new tars ({len(records)} registered)")
    keys = sorted(by_partition)
    if len(keys) > MAX_NEW_PARTITIONS_PER_TICK:  # a bounded tick: the rest come on the next ticks
        context.log.info(
            "%d partitions gained tars: registering the first %d, the rest on later ticks",
            len(keys),
            MAX_NEW_PARTITIONS_PER_TICK,
        )
        keys = keys[:MAX_NEW_PARTITIONS_PER_TICK]
    catalog.register_tars([r for k in keys for r in by_partition[k]])
    added = [k for k in keys if k not in existing]
    # a group that gained a tar is scored again (its other tars resume from their manifests)
    requests = [
        _run_request(k, scoring_model.num_gpus, f"new-{by_partition[k][-1].partition_key}") for k in keys
    ]
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[tars_partitions.build_add_request(added)] if added else [],
    )


@dg.schedule(
    cron_schedule="0 3 * * *",
    job=score_tars_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly: rescore partitions with a tar whose score table is missing or was made by another "
    "model.",
)
def stale_scores_schedule(
    context: dg.ScheduleEvaluationContext,
    home: UniFilterHome,
    duckdb: DuckDBResource,
    scoring_model: ScoringModelResource,
) -> list[dg.RunRequest] | dg.SkipReason:
    from unifilter_core.scorer import checkpoint_fingerprint

    try:
        checkpoint = scoring_model.resolve_checkpoint(home.root_path)
    except ValueError as exc:
        return dg.SkipReason(str(exc))
    fingerprint = checkpoint_fingerprint(checkpoint)
    registered = set(context.instance.get_dynamic_partitions(tars_partitions.name))
    specs = {s.name: s for s in home.source_specs()}
    partitions = {partition_of(k, specs) for k in home.catalog(duckdb).stale_partitions(fingerprint)}
    stale = sorted(k for k in partitions if k in registered)
    if not stale:
        return dg.SkipReason("every registered partition is scored by the current model")
    return [_run_request(k, scoring_model.num_gpus, f"stale-{_tick_label(context)}") for k in stale]


def _tick_label(context: dg.ScheduleEvaluationContext) -> str:
    """The tick's scheduled time as ``YYYYmmddTHHMM`` (now, for a context built outside a tick)."""
    try:
        when = context.scheduled_execution_time
    except CheckError:  # build_schedule_context() without a time: tests, manual evaluation
        when = None
    return (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M")
