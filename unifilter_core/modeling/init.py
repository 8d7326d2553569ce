"""Random-init checkpoints in the released layout (for tests, the embedded demo and stage-1 training)."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from unifilter_core.fileio import atomic_write_text
from unifilter_core.modeling.configuration_unifilter import config_class_for
from unifilter_core.modeling.modeling_unifilter import MODEL_CLASSES, UniFilterForQualityScoring
from unifilter_core.modeling.presets import load_preset
from unifilter_core.modeling.safetensors_io import WEIGHTS_NAME, save_safetensors_atomic
from unifilter_core.modeling.vision_tower import vision_config_to_dict

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
)
_SPECIAL_IDS = {"pad_token": "pad_token_id", "bos_token": "bos_token_id", "eos_token": "eos_token_id"}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_facts(tokenizer_dir: str | os.PathLike[str]) -> dict[str, int]:
    """``vocab_size`` (max token id + 1) and pad/bos/eos ids read from tokenizer files (no tokenizer library).

    Raises:
        ValueError: when the folder has no vocabulary, or a declared special token has no id.
    """
    directory = Path(tokenizer_dir)
    ids: dict[str, int] = {}
    fast = _read_json(directory / "tokenizer.json")
    ids.update((fast.get("model") or {}).get("vocab") or {})
    ids.update({t["content"]: t["id"] for t in fast.get("added_tokens") or []})
    ids.update(_read_json(directory / "vocab.json"))
    ids.update(_read_json(directory / "added_tokens.json"))
    tok_config = _read_json(directory / "tokenizer_config.json")
    for key, entry in (tok_config.get("added_tokens_decoder") or {}).items():
        ids[entry["content"]] = int(key)
    if not ids:
        raise ValueError(f"{directory} holds no tokenizer vocabulary (vocab.json or tokenizer.json)")
    facts = {"vocab_size": max(ids.values()) + 1}
    specials = {**tok_config, **_read_json(directory / "special_tokens_map.json")}
    for name, field in _SPECIAL_IDS.items():
        token = _token_content(specials.get(name))
        if token is None:
            continue
        if token not in ids:
            raise ValueError(f"{directory}: {name} {token!r} is not in the vocabulary")
        facts[field] = ids[token]
    return facts


def _apply_overrides(flat: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(flat)
    for key, value in overrides.items():
        if key == "vision_config" and isinstance(value, dict):
            out["vision_config"] = {**out.get("vision_config", {}), **value}
        else:
            out[key] = value
    return out


def _write_vision_tower_dir(model: UniFilterForQualityScoring, directory: Path) -> None:
    """Write the tower as a stand-alone SigLIP folder (config, image-processor config, safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    vision = model.config.vision_config
    atomic_write_text(directory / "config.json", json.dumps(vision_config_to_dict(vision), indent=2) + "\n")
    processor = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": vision.image_size, "width": vision.image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    atomic_write_text(directory / "preprocessor_config.json", json.dumps(processor, indent=2) + "\n")
    state = {f"vision_model.{k}": v for k, v in model.model.vision_tower.state_dict().items()}
    save_safetensors_atomic(state, directory / WEIGHTS_NAME)


def build_random_model(flat_config: dict[str, Any], *, seed: int = 0) -> UniFilterForQualityScoring:
    """A randomly initialized model from a flat config dict; the same seed gives the same weights."""
    config = config_class_for(flat_config.get("model_type"))(**flat_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODEL_CLASSES[config.model_type](config)
    return model.eval()


def init_checkpoint(
    preset: str | dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    include_vision_weights: bool = True,
    vision_tower_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a seeded random-init checkpoint in the released layout.

    Args:
        preset: a preset name (``"tiny"``, ``"world"``, ...) or a flat config dict.
        out_dir: checkpoint folder (created).
        tokenizer_dir: tokenizer files to copy in; ``vocab_size`` and pad/bos/eos ids are taken from them.
        seed: RNG seed for the weights.
        overrides: flat config keys to change (``vision_config`` merges key by key).
        include_vision_weights: False leaves the tower out of ``model.safetensors``.
        vision_tower_dir: also write the tower as a stand-alone SigLIP folder here (relative paths are relative
            to ``out_dir``) and set ``mm_vision_tower`` to this path as given.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    flat = load_preset(preset) if isinstance(preset, str) else copy.deepcopy(preset)
    flat = _apply_overrides(flat, overrides or {})
    if tokenizer_dir is not None:
        flat.update(tokenizer_facts(tokenizer_dir))
    if vision_tower_dir is not None:
        flat["mm_vision_tower"] = str(vision_tower_dir)
    model = build_random_model(flat, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    if vision_tower_dir is not None:
        tower = Path(vision_tower_dir)
        _write_vision_tower_dir(model, tower if tower.is_absolute() else out / tower)
    model.save_pretrained(out, include_vision_weights=include_vision_weights)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, out / name)
    logger.info("wrote random-init %s checkpoint (seed %d) to %s", model.config.model_type, seed, out)
    return out
