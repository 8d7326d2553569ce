"""Helpers both stages share: distributed context, model loading, freezing, Trainer arguments, outputs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unifilter_core.data.writer import atomic_write_bytes
from unifilter_core.training.config import TrainConfig, config_to_dict, resolve_deepspeed_config

logger = logging.getLogger(__name__)

CHECKPOINTS_SUBDIR = "checkpoints"
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
    "generation_config.json",
)
# Tower parts the model never runs (features are hidden_states[-1], before post_layernorm; no pooling head):
# always frozen so that distributed data parallel does not wait for their gradients.
UNUSED_TOWER_PARTS = ("post_layernorm", "head")


def world_size() -> int:
    """Processes of this run (``WORLD_SIZE`` as set by torchrun / deepspeed launchers; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True on global rank 0 (or when not distributed)."""
    return int(os.environ.get("RANK", "0")) == 0


def setup_torch(config: TrainConfig) -> None:
    """Apply CPU thread settings (``"auto"``: the cores idle now)."""
    from unifilter_core.cpus import resolve_threads

    threads = resolve_threads(config.torch_threads)
    if threads:
        torch.set_num_threads(threads)
        logger.info("torch threads: %d (torch_threads=%s)", threads, config.torch_threads)


def load_model(path: str, **kwargs: Any) -> Any:
    """Load a classifier checkpoint (released layout or ours) in float32 for training."""
    from unifilter_core.modeling import UniFilterForQualityScoring

    model = UniFilterForQualityScoring.from_pretrained(path, torch_dtype=torch.float32, **kwargs)
    model.train()
    return model


def apply_freezing(model: nn.Module, config: TrainConfig, *, freeze_head: bool) -> dict[str, int]:
    """Set ``requires_grad`` by part, following the config.

    Args:
        model: a ``UniFilterForQualityScoring``.
        config: ``freeze_vision_tower``, ``freeze_llm``, ``freeze_projector``.
        freeze_head: also freeze the score head (stage 1 does not use it).

    Returns:
        Trainable parameter counts by part (``vision_tower``, ``mm_projector``, ``language_model``, ``score``).
    """
    parts = {
        "vision_tower": (model.model.vision_tower, config.freeze_vision_tower),
        "mm_projector": (model.model.mm_projector, config.freeze_projector),
        "language_model": (model.model.language_model, config.freeze_llm),
        "score": (model.score, freeze_head),
    }
    for module, frozen in parts.values():
        module.requires_grad_(not frozen)
    for name in UNUSED_TOWER_PARTS:
        tower = model.model.vision_tower
        sub = getattr(getattr(tower, "vision_model", tower), name, None)
        if sub is not None:
            sub.requires_grad_(False)
    counts = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, (m, _) in parts.items()
    }
    if not any(counts.values()):
        raise ValueError("every parameter is frozen; unfreeze at least one of tower, projector, LLM")
    logger.info("trainable parameters by part: %s", counts)
    return counts


def training_arguments(config: TrainConfig, *, evaluate: bool, **extra: Any) -> Any:
    """transformers ``TrainingArguments`` for a stage config (checkpoints under ``output_dir/checkpoints``)."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    strategy = "epoch" if config.max_steps < 0 else "steps"
    args: dict[str, Any] = {
        "output_dir": str(Path(config.output_dir) / CHECKPOINTS_SUBDIR),
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "gradient_accumulation_steps": config.accumulation_steps(world_size()),
        "learning_rate": config.learning_rate,
        "num_train_epochs": config.num_train_epochs,
        "max_steps": config.max_steps,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_ratio,  # < 1: a share of the steps
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "bf16": config.bf16,
        "deepspeed": resolve_deepspeed_config(config.deepspeed),
        "seed": config.seed,
        "dataloader_num_workers": config.dataloader_num_workers,
        "logging_steps": config.logging_steps,
        "save_strategy": strategy,
        "save_steps": max(config.max_steps, 1),
        "save_total_limit": config.save_total_limit,
        "report_to": list(config.report_to) or "none",
        "remove_unused_columns": False,
        "use_cpu": not cuda,
        "ddp_backend": "gloo" if not cuda and world_size() > 1 else None,
        "disable_tqdm": True,
        "save_only_model": False,
    }
    if evaluate:
        args.update(eval_strategy=strategy, eval_steps=max(config.max_steps, 1))
    args.update(extra)
    return TrainingArguments(**args)


def enable_gradient_checkpointing(model: Any, config: TrainConfig) -> None:
    """Recompute activations of the LLM and tower layers in the backward pass when configured."""
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def last_checkpoint(config: TrainConfig) -> str | None:
    """The newest Trainer checkpoint under ``output_dir/checkpoints`` (for ``--resume``), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(config.output_dir) / CHECKPOINTS_SUBDIR
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def resume_target(config: TrainConfig, resume: bool | str) -> str | None:
    """The checkpoint to resume from: an explicit path, the last one when ``resume`` is True, else None."""
    if isinstance(resume, str):
        if not Path(resume).is_dir():
            raise ValueError(f"resume checkpoint {resume} does not exist")
        return resume
    if not resume:
        return None
    found = last_checkpoint(config)
    if found is None:
        logger.warning(
            "--resume: no checkpoint under %s; starting from scratch", Path(config.output_dir) / "checkpoints"
        )
    return found


def copy_tokenizer(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy the tokenizer (and generation config) files of a checkpoint folder."""
    for name in TOKENIZER_FILES:
        file = Path(src) / name
        if file.is_file():
            shutil.copy2(file, Path(dst) / name)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON to a temporary name in the destination folder, then rename."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode("utf-8"))


def write_run_config(config: TrainConfig, out: Path, stage: str) -> None:
    """Record the config a result came from (``training_config.json``; JSON, never a pickle)."""
    write_json_atomic(out / "training_config.json", {"stage": stage, **config_to_dict(config)})


def save_classifier(trainer: Any, out: Path, source_checkpoint: str) -> None:
    """Save the trainer's model in the released layout (gathering ZeRO-3 shards) with tokenizer files.

    Trainer's ``save_model`` also writes ``training_args.bin`` (a pickle); it is removed: our checkpoints hold no
    pickles.
    """
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        (out / "training_args.bin").unlink(missing_ok=True)
        copy_tokenizer(source_checkpoint, out)


def load_released_weights(model: nn.Module, checkpoint: str | os.PathLike[str]) -> None:
    """Load a released-layout ``model.safetensors`` (as Trainer checkpoints of our model hold) into ``model``,
    strictly: every key and shape must match."""
    from unifilter_core.modeling.checkpoint import load_state_strict, map_released_state
    from unifilter_core.modeling.safetensors_io import load_safetensors_dir

    directory = Path(checkpoint)
    state = load_safetensors_dir(directory, what="training checkpoint")
    mapped = map_released_state(state, model.config, directory, None)
    load_state_strict(model, mapped, source=str(directory))


class ReleasedLayoutLoading:
    """Trainer mixin: checkpoints of our model are in the released key layout, which transformers' own loader
    (a non-strict ``load_state_dict``) would silently skip; load them with the strict key mapping instead
    (resume and best-model reload). DeepSpeed checkpoints go through DeepSpeed's loader as usual."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if getattr(self, "is_deepspeed_enabled", False):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        load_released_weights(model if model is not None else self.model, resume_from_checkpoint)  # type: ignore[attr-defined]

    def _load_best_model(self) -> None:
        if getattr(self, "is_deepspeed_enabled", False):
            super()._load_best_model()  # type: ignore[misc]
            return
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        logger.info("loading the best checkpoint %s", best)
        load_released_weights(self.model, best)  # type: ignore[attr-defined]


class LengthGrouping:
    """Trainer mixin: with ``group_by_length``, batches hold samples of similar spliced length (captions with
    captions, long documents with long documents), which saves most of the padding compute of mixed data."""

    group_by_length = True

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset  # type: ignore[attr-defined]
        if not self.group_by_length or not hasattr(dataset, "lengths"):
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        args = self.args  # type: ignore[attr-defined]
        generator = torch.Generator().manual_seed(args.seed)
        return LengthGroupedSampler(
            args.train_batch_size * args.gradient_accumulation_steps,
            lengths=dataset.lengths(),
            generator=generator,
        )


def loss_curve(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's logged training points (epoch, step, loss, learning rate), for training curves."""
    return [
        {k: entry[k] for k in ("epoch", "step", "loss", "learning_rate") if k in entry}
        for entry in log_history
        if "loss" in entry
    ]
