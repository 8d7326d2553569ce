"""The Dagster definitions of the UniFilter platform (assets, checks, jobs, sensor, schedule, resources)."""

from __future__ import annotations

import dagster as dg

from unifilter_dagster.assets.generation import (
    llava_pretrain_subset,
    synthetic_caption_pairs,
    synthetic_interleaved_pairs,
)
from unifilter_dagster.assets.tars import filtered_dataset, quality_threshold, scores, tar_manifest
from unifilter_dagster.assets.training import stage1_projector, stage2_classifier
from unifilter_dagster.automation import (
    filter_tars_job,
    new_tars_sensor,
    score_tars_job,
    stale_scores_schedule,
    train_classifier_job,
)
from unifilter_dagster.resources import default_resources

ALL_ASSETS = [
    synthetic_caption_pairs,
    synthetic_interleaved_pairs,
    llava_pretrain_subset,
    stage1_projector,
    stage2_classifier,
    tar_manifest,
    scores,
    quality_threshold,
    filtered_dataset,
]

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[score_tars_job, filter_tars_job, train_classifier_job],
    sensors=[new_tars_sensor],
    schedules=[stale_scores_schedule],
    resources=default_resources(),
    executor=dg.multiprocess_executor,
)
