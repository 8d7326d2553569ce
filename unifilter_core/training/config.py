"""Typed training configurations and named presets (presets are data: ``training/presets/*.json``).

A preset file holds one section per stage (``{"stage1": {...}, "stage2": {...}}``); :func:`load_config` takes a
preset name or a JSON file (either a two-stage preset or a single stage's fields) and ``key=value`` overrides.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PRESET_DIR = Path(__file__).parent / "presets"
DEEPSPEED_DIR = Path(__file__).parent / "deepspeed_configs"
STAGES = ("stage1", "stage2")


@dataclass
class TrainConfig:
    """Options shared by both stages (paths, optimisation, scale, freezing).

    Attributes:
        model_path: checkpoint folder in the released layout to start from (``init_checkpoint`` output, a stage-1
            output with a full checkpoint, or a released model).
        output_dir: where the result is written (intermediate Trainer checkpoints go to ``output_dir/checkpoints``).
        data_path: training JSON (LLaVA-Pretrain for stage 1, UniFilter training JSON for stage 2).
        image_folder: folder the records' image paths are relative to (default: the JSON's folder).
        learning_rate: peak learning rate.
        num_train_epochs: passes over the training data.
        max_steps: stop after this many optimiser steps (-1: run the epochs; tests use small values).
        per_device_train_batch_size: samples per device per forward.
        gradient_accumulation_steps: forwards per optimiser step (ignored when ``global_batch_size`` is set).
        global_batch_size: samples per optimiser step over all processes; when set, the accumulation steps are
            derived from it, the per-device batch and the world size (it must divide evenly).
        lr_scheduler_type: a transformers scheduler name (``cosine``, ``constant_with_warmup``, ``linear``...).
        warmup_ratio: share of the steps spent warming up.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm (0 disables).
        bf16: bfloat16 mixed precision.
        gradient_checkpointing: recompute activations in the backward pass (LLM layers).
        deepspeed: ``"zero2"`` / ``"zero3"`` (shipped configs), a path to a DeepSpeed JSON, or None.
        freeze_vision_tower / freeze_llm / freeze_projector: parameter groups kept fixed (``freeze_llm`` covers the
            token embeddings, decoder layers and final norm).
        seed: random seed (data order, swaps, dropout).
        dataloader_num_workers: data-loader worker processes (0: in the main process).
        torch_threads: CPU threads for torch: an int, ``"auto"`` (the cores idle when training starts:
            ``unifilter_core.cpus.idle_cpus``; another thread count changes float rounding, docs/training.md) or
            None (torch's default).
        logging_steps: log the training loss every so many optimiser steps.
        save_total_limit: intermediate checkpoints kept (the newest ones; the best one is always kept).
        max_length: longest spliced sequence (None: the checkpoint's ``tokenizer_model_max_length``).
        caption_max_tokens: caption id limit of the scorer (75 released), applied in training too.
        report_to: transformers ``report_to`` integrations (``[]`` for none).
        group_by_length: batch samples of similar length together (random order of length-sorted chunks).
    """

    model_path: str = ""
    output_dir: str = ""
    data_path: str = ""
    image_folder: str | None = None
    learning_rate: float = 1e-3
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    global_batch_size: int | None = None
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    freeze_vision_tower: bool = True
    freeze_llm: bool = True
    freeze_projector: bool = False
    seed: int = 0
    dataloader_num_workers: int = 0
    torch_threads: int | str | None = None
    logging_steps: int = 10
    save_total_limit: int = 2
    max_length: int | None = None
    caption_max_tokens: int | None = 75
    report_to: list[str] = field(default_factory=list)
    group_by_length: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot work."""
        for name in ("model_path", "output_dir", "data_path"):
            if not getattr(self, name):
                raise ValueError(
                    f"{type(self).__name__}.{name} is required (set it in the config or --set {name}=...)"
                )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("per_device_train_batch_size and gradient_accumulation_steps must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.torch_threads != "auto":
            from unifilter_core.cpus import resolve_threads

            resolve_threads(self.torch_threads)  # raises on a bad value
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be None or >= 1, got {self.global_batch_size}")

    def accumulation_steps(self, world_size: int) -> int:
        """Forwards per optimiser step for ``world_size`` processes (from ``global_batch_size`` when set)."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.per_device_train_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) x world size ({world_size}); change one of them"
            )
        return self.global_batch_size // per_step


@dataclass
class Stage1Config(TrainConfig):
    """Stage 1: projector pre-training with next-token loss on LLaVA-Pretrain-format captions.

    Attributes:
        save_full_checkpoint: also write the whole model in the released layout (always done when the LLM or the
            tower was trained, since the projector alone would then lose that training).
    """

    save_full_checkpoint: bool = False


@dataclass
class Stage2Config(TrainConfig):
    """Stage 2: quality-classifier training from UniFilter training JSON.

    Attributes:
        eval_data_path: validation JSON (UniFilter format); evaluated each epoch, the best epoch by ``metric`` kept.
        eval_image_folder: image folder of the validation JSON (default: the JSON's folder).
        projector_path: a stage-1 ``mm_projector.safetensors`` loaded over ``model_path``'s projector.
        num_labels: re-initialise the score head with this many outputs (None: keep the checkpoint's head).
            1 = regression onto levels 0..3 (released), >= 2 = classes 0..num_labels-1.
        regression_loss: loss of a 1-output head: ``mse`` (released), ``l1`` or ``huber`` (both estimate a
            median-like value, which rounds to the right level more often when the model hesitates).
        swap_negative_fraction: share of level-3 training samples given another sample's image(s) and label
            ``swap_negative_label`` (teaches the model that a fine text does not fit any image).
        swap_negative_label: level given to swapped samples.
        text_first_fraction: share of caption training samples shown with the image after the caption (the
            layout of documents whose descriptions precede their images), label unchanged; 0 keeps the released
            recipe.
        per_device_eval_batch_size: samples per device per evaluation forward.
        metric: metric that picks the best epoch (``accuracy`` released; ``spearman`` or ``macro_f1``).
        max_images: documents with more images are skipped (recorded, not trained on).
        max_text_tokens: documents with longer id sequences are skipped.
    """

    eval_data_path: str | None = None
    eval_image_folder: str | None = None
    projector_path: str | None = None
    num_labels: int | None = None
    regression_loss: Literal["mse", "l1", "huber"] = "mse"
    swap_negative_fraction: float = 0.0
    swap_negative_label: int = 1
    text_first_fraction: float = 0.0
    per_device_eval_batch_size: int = 32
    metric: Literal["accuracy", "spearman", "macro_f1"] = "accuracy"
    max_images: int | None = 10
    max_text_tokens: int | None = 6000
    freeze_llm: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.swap_negative_fraction <= 1:
            raise ValueError(f"swap_negative_fraction must be in [0, 1], got {self.swap_negative_fraction}")
        if not 0 <= self.text_first_fraction <= 1:
            raise ValueError(f"text_first_fraction must be in [0, 1], got {self.text_first_fraction}")
        if self.num_labels is not None and self.num_labels < 1:
            raise ValueError(f"num_labels must be None or >= 1, got {self.num_labels}")
        if self.regression_loss not in ("mse", "l1", "huber"):
            raise ValueError(f"regression_loss must be mse, l1 or huber, got {self.regression_loss!r}")
        if self.metric not in ("accuracy", "spearman", "macro_f1"):
            raise ValueError(f"metric must be accuracy, spearman or macro_f1, got {self.metric!r}")


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {"stage1": Stage1Config, "stage2": Stage2Config}


def list_presets() -> list[str]:
    """Names of the shipped training presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def resolve_deepspeed_config(value: str | None) -> str | None:
    """``"zero2"`` / ``"zero3"`` -> the shipped JSON's path; a path is checked and returned; None stays None."""
    if value is None or value == "":
        return None
    shipped = DEEPSPEED_DIR / f"{value}.json"
    if shipped.is_file():
        return str(shipped)
    if Path(value).is_file():
        return str(Path(value))
    raise ValueError(
        f"deepspeed={value!r} is neither a shipped config (zero2, zero3) nor an existing JSON file"
    )


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value); the value is parsed as JSON when it can be (numbers, true, null, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _read_section(source: str | os.PathLike[str], stage: str) -> dict[str, Any]:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{source}.json"
        if not path.is_file():
            raise ValueError(f"unknown training preset {str(source)!r}; shipped presets: {list_presets()}")
    elif not path.is_file():
        raise ValueError(f"training config file {path} does not exist")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    section = data.get(stage, data) if any(s in data for s in STAGES) else data
    if not isinstance(section, dict):
        raise ValueError(f"{path}: section {stage!r} must be a JSON object")
    return {k: v for k, v in section.items() if not k.startswith("_")}


def build_config(stage: str, values: dict[str, Any]) -> TrainConfig:
    """Build a stage's config from a dict, rejecting unknown keys with the list of known ones."""
    if stage not in CONFIG_CLASSES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    cls = CONFIG_CLASSES[stage]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {stage} option(s) {unknown}; known options: {sorted(names)}")
    return cls(**values)


def load_config(
    source: str | os.PathLike[str] | None,
    stage: str,
    overrides: dict[str, Any] | list[str] | None = None,
) -> TrainConfig:
    """A stage's config from a preset name or JSON file plus overrides (a dict or ``key=value`` strings).

    Raises:
        ValueError: unknown preset, missing file, unknown option or malformed override.
    """
    values = _read_section(source, stage) if source is not None else {}
    if isinstance(overrides, list):
        overrides = dict(parse_override(item) for item in overrides)
    values.update(overrides or {})
    return build_config(stage, values)


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A JSON-ready dict of a config (written next to the outputs)."""
    return dataclasses.asdict(config)
