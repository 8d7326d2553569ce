"""Stage 2: quality-classifier training (LLM + projector + score head; tower frozen by default).

Loss: MSE onto levels 0..3 for a 1-output head (released; ``l1`` / ``huber`` as options), cross-entropy for a
class head. Each epoch is evaluated (``metrics.classification_report``); the best epoch by ``config.metric`` is
kept and saved to ``output_dir`` in the released layout with the tokenizer, ``metrics.json`` (best report, per-epoch
history, training curve, wall time, data failures) and ``training_config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unifilter_core.processing import ProcessingConfig, UniFilterProcessor
from unifilter_core.training.common import (
    LengthGrouping,
    ReleasedLayoutLoading,
    apply_freezing,
    enable_gradient_checkpointing,
    is_main_process,
    load_model,
    loss_curve,
    resume_target,
    save_classifier,
    setup_torch,
    training_arguments,
    write_json_atomic,
    write_run_config,
)
from unifilter_core.training.config import Stage2Config
from unifilter_core.training.data import Collator, QualityDataset
from unifilter_core.training.metrics import SCALAR_METRICS, classification_report
from unifilter_core.training.stage1 import load_projector

logger = logging.getLogger(__name__)

NUM_LEVELS = 4
HISTORY_FILE = "eval_history.jsonl"


def quality_loss(logits: torch.Tensor, labels: torch.Tensor, regression_loss: str = "mse") -> torch.Tensor:
    """Loss of head outputs against levels.

    Args:
        logits: ``[B, num_labels]`` float32.
        labels: ``[B]`` levels.
        regression_loss: ``mse``, ``l1`` or ``huber`` for a 1-output head (ignored for classes).

    Returns:
        Scalar loss (cross-entropy for ``num_labels >= 2``).
    """
    if logits.shape[-1] >= 2:
        return F.cross_entropy(logits.float(), labels.long())
    pred, target = logits[:, 0].float(), labels.float()
    if regression_loss == "mse":
        return F.mse_loss(pred, target)
    if regression_loss == "l1":
        return F.l1_loss(pred, target)
    if regression_loss == "huber":
        return F.huber_loss(pred, target, delta=0.5)
    raise ValueError(f"regression_loss must be mse, l1 or huber, got {regression_loss!r}")


def set_num_labels(model: nn.Module, num_labels: int, seed: int) -> None:
    """Replace the score head by a freshly initialised one with ``num_labels`` outputs (no-op when equal)."""
    if model.config.num_labels == num_labels:
        return
    hidden = model.score.in_features
    generator = torch.Generator().manual_seed(seed)
    head = nn.Linear(hidden, num_labels, bias=False)
    std = float(getattr(model.config.text_config, "initializer_range", 0.02))
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_labels, hidden, generator=generator) * std)
    model.score = head
    model.config.num_labels = num_labels
    logger.info("score head re-initialised with %d outputs", num_labels)


def make_processor(model: Any, checkpoint: str, config: Stage2Config) -> UniFilterProcessor:
    """The checkpoint's tokenizer + processing options with the config's limits."""
    from unifilter_core.tokenization import load_tokenizer

    pconfig = ProcessingConfig.from_model_config(
        model.config,
        max_length=config.max_length,
        caption_max_tokens=config.caption_max_tokens,
        max_images=config.max_images,
        max_text_tokens=config.max_text_tokens,
    )
    return UniFilterProcessor(load_tokenizer(checkpoint), pconfig)


def make_dataset(
    processor: UniFilterProcessor, config: Stage2Config, *, train: bool, cache_images: bool
) -> QualityDataset:
    """The training (with swap negatives) or validation dataset of a stage-2 config."""
    path = config.data_path if train else config.eval_data_path
    folder = config.image_folder if train else config.eval_image_folder
    return QualityDataset(
        processor,
        path,
        folder,
        caption_max_tokens=config.caption_max_tokens,
        max_images=config.max_images,
        max_text_tokens=config.max_text_tokens,
        swap_negative_fraction=config.swap_negative_fraction if train else 0.0,
        swap_negative_label=config.swap_negative_label,
        text_first_fraction=config.text_first_fraction if train else 0.0,
        cache_images=cache_images,
        seed=config.seed,
    )


def _quality_trainer_class() -> type:
    from transformers import Trainer

    class QualityTrainer(ReleasedLayoutLoading, LengthGrouping, Trainer):
        """Trainer whose loss follows ``regression_loss`` and whose predictions are only the logits."""

        regression_loss = "mse"

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            features = {k: v for k, v in inputs.items() if k != "labels"}
            outputs = model(**features, last_token_only=True)  # the loss reads the last tokens only
            loss = quality_loss(outputs.logits, inputs["labels"], self.regression_loss)
            return (loss, {"logits": outputs.logits}) if return_outputs else loss

    return QualityTrainer


class _EvalRecorder:
    """``compute_metrics`` for the Trainer: returns the scalar metrics, appends the full report to a JSONL file."""

    def __init__(self, history_path: Path, fresh: bool) -> None:
        self.path = history_path
        self.trainer: Any = None
        if fresh and is_main_process():
            history_path.unlink(missing_ok=True)

    def __call__(self, prediction: Any) -> dict[str, float]:
        logits = prediction.predictions
        labels = np.asarray(prediction.label_ids).reshape(-1).round().astype(np.int64)
        report = classification_report(logits, labels, NUM_LEVELS)
        state = self.trainer.state if self.trainer is not None else None
        report.update(epoch=getattr(state, "epoch", None), step=getattr(state, "global_step", None))
        if is_main_process():
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(report) + "\n")
        logger.info(
            "eval epoch %s: accuracy %.4f spearman %.4f macro_f1 %.4f",
            report["epoch"], report["accuracy"], report["spearman"], report["macro_f1"],
        )  # fmt: skip
        return {k: report[k] for k in SCALAR_METRICS}


def read_history(out: Path) -> list[dict[str, Any]]:
    """Per-evaluation reports of a stage-2 run (from ``eval_history.jsonl``)."""
    path = out / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_stage2(
    config: Stage2Config, *, resume: bool | str = False, cache_images: bool | None = None
) -> Path:
    """Run stage 2 and write its outputs (see the module docstring).

    Args:
        config: the stage-2 configuration (``eval_data_path`` required).
        resume: True to continue from the newest checkpoint in ``output_dir/checkpoints``, or a checkpoint path.
        cache_images: keep preprocessed images in memory (default: when the tower input is at most 64 px).

    Returns:
        ``output_dir`` (a checkpoint loadable with ``load_scorer``).
    """
    config.validate()
    if not config.eval_data_path:
        raise ValueError("stage 2 needs eval_data_path (validation JSON) to pick the best epoch")
    setup_torch(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model_path)
    if config.projector_path:
        load_projector(model, config.projector_path)
    if config.num_labels is not None:
        set_num_labels(model, config.num_labels, config.seed)
    apply_freezing(model, config, freeze_head=False)
    enable_gradient_checkpointing(model, config)
    processor = make_processor(model, config.model_path, config)
    cache = cache_images if cache_images is not None else processor.config.image_size <= 64
    train_set = make_dataset(processor, config, train=True, cache_images=cache)
    eval_set = make_dataset(processor, config, train=False, cache_images=cache)
    target = resume_target(config, resume)
    recorder = _EvalRecorder(out / HISTORY_FILE, fresh=target is None)
    args = training_arguments(
        config,
        evaluate=True,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        load_best_model_at_end=True,
        metric_for_best_model=config.metric,
        greater_is_better=True,
        label_names=["labels"],
    )
    trainer_cls = _quality_trainer_class()
    trainer_cls.regression_loss = config.regression_loss
    trainer_cls.group_by_length = config.group_by_length
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(processor.tokenizer.pad_token_id, float_labels=model.config.num_labels == 1),
        compute_metrics=recorder,
    )
    recorder.trainer = trainer
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=target)
    wall = time.perf_counter() - start
    save_classifier(trainer, out, config.model_path)
    if trainer.is_world_process_zero():
        _write_metrics(trainer, config, out, result, wall, train_set, eval_set)
    return out


def _write_metrics(
    trainer: Any, config: Stage2Config, out: Path, result: Any, wall: float, train_set: Any, eval_set: Any
) -> None:
    history = read_history(out)
    best = max(history, key=lambda r: r[config.metric]) if history else None
    curve = loss_curve(trainer.state.log_history)
    metrics = {
        "metric": config.metric,
        "best": best,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "history": history,
        "training_curve": curve,
        "train_loss": float(result.training_loss) if not math.isnan(result.training_loss) else None,
        "global_steps": int(result.global_step),
        "wall_seconds": wall,
        "num_labels": int(trainer.model.config.num_labels),
        "data": {"train": train_set.failure_summary(), "eval": eval_set.failure_summary()},
    }
    write_json_atomic(out / "metrics.json", metrics)
    write_run_config(config, out, "stage2")
    if best:
        logger.info(
            "stage 2 done in %.1f s: best %s %.4f (accuracy %.4f, spearman %.4f) -> %s",
            wall, config.metric, best[config.metric], best["accuracy"], best["spearman"], out,
        )  # fmt: skip
