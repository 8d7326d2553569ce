"""Training: stage-1 projector pre-training and stage-2 quality-classifier training (docs/training.md).

The embedded world adds a step before stage 1: ``vision.pretrain_world_tower`` gives its tiny tower the
pre-training a real SigLIP has. Entry points run single-process, under ``torchrun`` and under the ``deepspeed`` launcher (ZeRO-2/3 configs in
``deepspeed_configs/``). Configs are typed dataclasses; presets are data in ``presets/*.json``.
"""

from __future__ import annotations

from unifilter_core.training.config import (
    Stage1Config,
    Stage2Config,
    TrainConfig,
    list_presets,
    load_config,
    parse_override,
    resolve_deepspeed_config,
)
from unifilter_core.training.evaluate import evaluate_checkpoint, shuffle_dataset_images
from unifilter_core.training.metrics import classification_report, predicted_levels, spearman
from unifilter_core.training.stage1 import PROJECTOR_FILE, load_projector, save_projector, train_stage1
from unifilter_core.training.stage2 import read_history, train_stage2
from unifilter_core.training.vision import VisionPretrainConfig, pretrain_world_tower
from unifilter_core.training.world import (
    prepare_world_init,
    train_world_classifier,
    world_stage1_config,
    world_stage2_config,
)

__all__ = [
    "PROJECTOR_FILE",
    "Stage1Config",
    "Stage2Config",
    "TrainConfig",
    "VisionPretrainConfig",
    "classification_report",
    "evaluate_checkpoint",
    "list_presets",
    "load_config",
    "load_projector",
    "parse_override",
    "predicted_levels",
    "pretrain_world_tower",
    "prepare_world_init",
    "read_history",
    "resolve_deepspeed_config",
    "save_projector",
    "shuffle_dataset_images",
    "spearman",
    "train_stage1",
    "train_stage2",
    "train_world_classifier",
    "world_stage1_config",
    "world_stage2_config",
]
