"""Automation: the scoring, filtering and training jobs, the new-tar sensor and the stale-partition backfill
schedule."""

from datetime import datetime, timezone

import dagster as dg
from dagster_duckdb import DuckDBResource
from dagster_shared.check import CheckError

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


#: new tars one sensor tick registers and requests at most: a first tick over a million new tars would outrun the
#: tick's time limit and the reply size limit of Dagster's gRPC
MAX_NEW_TARS_PER_TICK = 5_000


@dg.sensor(
    job=score_tars_job,
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Registers tars that appear under the sources as partitions and requests their scoring.",
)
def new_tars_sensor(
    context: dg.SensorEvaluationContext,
    home: UniFilterHome,
    duckdb: DuckDBResource,
    scoring_model: ScoringModelResource,
) -> dg.SensorResult | dg.SkipReason:
    records = discover_tar_records(home.root_path, home.source_specs())
    existing = set(context.instance.get_dynamic_partitions(tars_partitions.name))
    new = [r for r in records if r.partition_key not in existing]
    if not new:
        return dg.SkipReason(f"no new tars ({len(records)} registered)")
    if len(new) > MAX_NEW_TARS_PER_TICK:  # a bounded tick: the rest come on the next ticks
        context.log.info(
            "%d new tars: registering the first %d, the rest on later ticks", len(new), MAX_NEW_TARS_PER_TICK
        )
        new = new[:MAX_NEW_TARS_PER_TICK]
    home.catalog(duckdb).register_tars(new)
    keys = [r.partition_key for r in new]
    return dg.SensorResult(
        run_requests=[_run_request(k, scoring_model.num_gpus, "new") for k in keys],
        dynamic_partitions_requests=[tars_partitions.build_add_request(keys)],
    )


@dg.schedule(
    cron_schedule="0 3 * * *",
    job=score_tars_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Nightly: rescore partitions whose score table is missing or was made by another model.",
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
    stale = [k for k in home.catalog(duckdb).stale_partitions(fingerprint) if k in registered]
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
