"""The embedded world's training pipeline: tokenizer -> random init + tower pre-training -> stage 1 -> stage 2.

The Dagster assets call the pieces separately (:func:`prepare_world_init`, then ``train_stage1`` with
:func:`world_stage1_config`, then ``train_stage2`` with :func:`world_stage2_config`);
:func:`train_world_classifier` runs them in one call for the demo and for experiments. Paths follow the data-root
layout (design.md): ``pretrain/llava_pretrain``, ``synthetic/<kind>``, ``models/...``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unifilter_core.data.writer import atomic_write_bytes
from unifilter_core.paths import models_dir, pretrain_dir, synthetic_dir
from unifilter_core.processing import IMAGE_TOKEN
from unifilter_core.records import SAMPLE_KINDS
from unifilter_core.training.common import write_json_atomic
from unifilter_core.training.config import Stage1Config, Stage2Config, load_config
from unifilter_core.training.data import _image_folder, read_records
from unifilter_core.training.vision import VisionPretrainConfig

logger = logging.getLogger(__name__)

PRETRAIN_JSON = "blip_laion_cc_sbu_558k.json"
KINDS = SAMPLE_KINDS


def world_texts(root: Path) -> Iterator[str]:
    """Every text of the world's training data (pretrain captions, synthetic train texts) for the tokenizer."""
    pretrain = pretrain_dir(root) / PRETRAIN_JSON
    if pretrain.is_file():
        for record in read_records(pretrain):
            for turn in record.get("conversations", []):
                yield turn["value"].replace(IMAGE_TOKEN, "")
    for kind in KINDS:
        path = synthetic_dir(root, kind) / "train.json"
        if path.is_file():
            for record in read_records(path):
                yield record["text"].replace(IMAGE_TOKEN, "")


def world_config_of(root: str | os.PathLike[str]) -> Any:
    """The ``WorldConfig`` the world under ``root`` was written with (``world/world.json``), else the default."""
    from unifilter_core.synth.world import WorldConfig, read_world_manifest

    manifest = read_world_manifest(root)
    return WorldConfig.from_dict(manifest["config"]) if manifest and "config" in manifest else WorldConfig()


def prepare_world_init(root: str | os.PathLike[str], *, vocab_size: int = 1024, seed: int = 0, preset: str = "world",
                       overrides: dict[str, Any] | None = None, world: Any = None,
                       vision: VisionPretrainConfig | bool = True) -> Path:  # fmt: skip
    """Train the world's BPE tokenizer, write a random-init checkpoint with it and pre-train its vision tower on
    the world's scenes (``models/init``; :mod:`unifilter_core.training.vision` says why).

    Args:
        root: the data root holding the world.
        vocab_size / seed / preset / overrides: the tokenizer size and the ``init_checkpoint`` arguments.
        world: the ``WorldConfig`` whose scenes pre-train the tower (default: the one under ``root``).
        vision: ``True`` (default sizes), a :class:`VisionPretrainConfig`, or ``False`` to keep the random tower.

    Returns:
        The init checkpoint folder (with ``vision_pretrain.json`` when the tower was pre-trained).
    """
    from unifilter_core.modeling import init_checkpoint
    from unifilter_core.tokenization import train_bpe_tokenizer

    models = models_dir(Path(root))
    tok = train_bpe_tokenizer(world_texts(Path(root)), models / "tokenizer", vocab_size=vocab_size)
    init = Path(init_checkpoint(preset, models / "init", tokenizer_dir=tok, seed=seed, overrides=overrides))
    if vision is False:
        return init
    from unifilter_core.modeling import UniFilterForQualityScoring
    from unifilter_core.processing import ProcessingConfig, UniFilterProcessor
    from unifilter_core.tokenization import load_tokenizer
    from unifilter_core.training.vision import pretrain_world_tower

    model = UniFilterForQualityScoring.from_pretrained(init)
    processor = UniFilterProcessor(load_tokenizer(init), ProcessingConfig.from_model_config(model.config))
    vision_config = vision if isinstance(vision, VisionPretrainConfig) else VisionPretrainConfig(seed=seed)
    result = pretrain_world_tower(model, processor, world or world_config_of(root), vision_config)
    model.save_pretrained(init)
    write_json_atomic(init / "vision_pretrain.json", result)
    return init


def merge_pairs(root: Path, split: str, kinds: tuple[str, ...], out: Path) -> Path:
    """One UniFilter JSON of ``split`` from several kinds, image paths made absolute (``out`` written)."""
    merged: list[dict[str, Any]] = []
    for kind in kinds:
        path = synthetic_dir(root, kind) / f"{split}.json"
        if not path.is_file():
            continue
        folder = _image_folder(path, None).resolve()
        for record in read_records(path):
            image = record.get("image")
            paths = [image] if isinstance(image, str) else image
            record = dict(record, kind=kind, image=[str(folder / p) for p in paths] if paths else [])
            if isinstance(image, str):
                record["image"] = record["image"][0]
            merged.append(record)
    if not merged:
        raise ValueError(f"no synthetic {split} pairs under {root / 'synthetic'} for kinds {kinds}")
    # a unique temporary name per writer: two trainings on one data root may merge at the same moment
    return atomic_write_bytes(out, json.dumps(merged).encode("utf-8"))


def world_stage1_config(root: str | os.PathLike[str], *, preset: str = "world", overrides: dict[str, Any] | None = None,
                        model_path: str | None = None) -> Stage1Config:  # fmt: skip
    """Stage-1 config of the world preset with the data-root paths filled in."""
    root = Path(root)
    paths = {
        "model_path": model_path or str(models_dir(root) / "init"),
        "output_dir": str(models_dir(root) / "stage1_projector"),
        "data_path": str(pretrain_dir(root) / PRETRAIN_JSON),
        "image_folder": str(pretrain_dir(root) / "images"),
    }
    return load_config(preset, "stage1", {**paths, **(overrides or {})})  # type: ignore[return-value]


def world_stage2_config(root: str | os.PathLike[str], *, preset: str = "world", overrides: dict[str, Any] | None = None,
                        model_path: str | None = None, kinds: tuple[str, ...] = KINDS) -> Stage2Config:  # fmt: skip
    """Stage-2 config of the world preset: training/validation pairs of ``kinds`` merged under ``models/``."""
    root = Path(root)
    data = models_dir(root) / "stage2_data"
    train = merge_pairs(root, "train", kinds, data / "train.json")
    val = merge_pairs(root, "val", kinds, data / "val.json")
    paths = {
        "model_path": model_path or str(models_dir(root) / "stage1_projector"),
        "output_dir": str(models_dir(root) / "stage2_classifier"),
        "data_path": str(train),
        "image_folder": "/",
        "eval_data_path": str(val),
        "eval_image_folder": "/",
    }
    return load_config(preset, "stage2", {**paths, **(overrides or {})})  # type: ignore[return-value]


def train_world_classifier(
    root: str | os.PathLike[str],
    *,
    preset: str = "world",
    stage1_overrides: dict[str, Any] | None = None,
    stage2_overrides: dict[str, Any] | None = None,
    kinds: tuple[str, ...] = KINDS,
    run_stage1: bool = True,
    seed: int = 0,
    init_overrides: dict[str, Any] | None = None,
) -> Path:
    """Tokenizer -> init -> stage 1 -> stage 2 on a world written under ``root`` (``synth.write_world``).

    Returns:
        The stage-2 classifier folder (``models/stage2_classifier``), loadable with ``load_scorer``.
    """
    from unifilter_core.training.stage1 import train_stage1
    from unifilter_core.training.stage2 import train_stage2

    root = Path(root)
    times: dict[str, float] = {}
    start = time.perf_counter()
    init = prepare_world_init(root, seed=seed, overrides=init_overrides)
    times["init"] = time.perf_counter() - start
    model_path = str(init)
    if run_stage1:
        s1 = world_stage1_config(root, preset=preset, overrides=stage1_overrides, model_path=model_path)
        t = time.perf_counter()
        model_path = str(train_stage1(s1))
        times["stage1"] = time.perf_counter() - t
    s2 = world_stage2_config(
        root, preset=preset, overrides=stage2_overrides, model_path=model_path, kinds=kinds
    )
    t = time.perf_counter()
    out = train_stage2(s2)
    times["stage2"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - start
    write_json_atomic(out / "pipeline_times.json", times)
    logger.info("world classifier trained: %s", {k: round(v, 1) for k, v in times.items()})
    return out
