"""Resolving the SigLIP vision tower of a checkpoint: its architecture and, when needed, its weights.

The released ``config.json`` names the tower only by ``mm_vision_tower`` (a hub name or a path). This module turns
that reference (or the user's ``vision_tower=`` override) into a :class:`SiglipVisionConfig` and, for weights,
a local directory, never touching the network.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import SiglipVisionConfig

from unifilter_core.modeling.presets import KNOWN_VISION_TOWERS, load_preset
from unifilter_core.modeling.safetensors_io import load_safetensors_dir

logger = logging.getLogger(__name__)

VISION_OVERRIDE_HINT = (
    "pass `vision_tower=<local SigLIP directory>` (a folder with config.json, preprocessor_config.json and "
    "model.safetensors, e.g. a downloaded google/siglip-so400m-patch14-384)"
)

# Fields of a SigLIP vision config that define the architecture (what we write into our own config.json).
VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "vision_use_head",
)


@dataclass(frozen=True)
class ResolvedVisionTower:
    """Where a vision tower's architecture came from.

    Attributes:
        config: the SigLIP vision architecture.
        local_dir: a local SigLIP directory (source of weights when the checkpoint lacks them), else None.
        source: human-readable origin for logs and errors.
    """

    config: SiglipVisionConfig
    local_dir: Path | None
    source: str


def vision_config_to_dict(config: SiglipVisionConfig) -> dict[str, Any]:
    """The compact architecture dict written as ``vision_config`` in our config.json."""
    return {"model_type": "siglip_vision_model", **{k: getattr(config, k) for k in VISION_FIELDS}}


def find_local_tower_dir(reference: str, base_dir: Path | None, *, allow_cwd: bool) -> Path | None:
    """The existing local directory ``reference`` names, or None.

    Args:
        reference: ``mm_vision_tower`` or a ``vision_tower=`` override.
        base_dir: the checkpoint folder: relative references are looked up there first.
        allow_cwd: also try ``reference`` relative to the working directory (for user overrides).
    """
    path = Path(reference).expanduser()
    candidates: list[Path] = []
    if path.is_absolute():
        candidates.append(path)
    else:
        if base_dir is not None:
            candidates.append(base_dir / path)
        if allow_cwd:
            candidates.append(path)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def vision_config_from_dir(directory: Path) -> SiglipVisionConfig:
    """Read the SigLIP vision architecture from a local SigLIP directory.

    ``config.json`` may be a full ``SiglipConfig`` (``model_type`` ``siglip``, nested ``vision_config``) or a
    ``SiglipVisionConfig`` (``siglip_vision_model``). ``preprocessor_config.json`` must exist next to it.

    Raises:
        ValueError: on missing files or a model type that is not SigLIP.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"vision tower directory {directory} has no config.json; {VISION_OVERRIDE_HINT}")
    if not (directory / "preprocessor_config.json").is_file():
        raise ValueError(
            f"vision tower directory {directory} has no preprocessor_config.json (a SigLIP image-processor "
            f"config); {VISION_OVERRIDE_HINT}"
        )
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    model_type = raw.get("model_type")
    if model_type == "siglip":
        vision = dict(raw.get("vision_config") or {})
    elif model_type == "siglip_vision_model":
        vision = raw
    else:
        raise ValueError(
            f"{config_path} has model_type {model_type!r}; expected a SigLIP config ('siglip' or "
            f"'siglip_vision_model')"
        )
    kwargs = {k: vision[k] for k in VISION_FIELDS if k in vision}
    config = SiglipVisionConfig(**kwargs)
    _check_preprocessor(directory, config)
    return config


def _check_preprocessor(directory: Path, config: SiglipVisionConfig) -> None:
    """Warn when the image processor disagrees with the tower size or the 0.5 mean/std normalization."""
    raw = json.loads((directory / "preprocessor_config.json").read_text(encoding="utf-8"))
    size = raw.get("size")
    sizes = set(size.values()) if isinstance(size, dict) else {size} if isinstance(size, int) else set()
    if sizes and sizes != {config.image_size}:
        logger.warning(
            "%s: preprocessor size %s differs from image_size %d", directory, size, config.image_size
        )
    for key in ("image_mean", "image_std"):
        values = raw.get(key)
        if values is not None and any(abs(v - 0.5) > 1e-6 for v in values):
            logger.warning("%s: %s=%s, but UniFilter normalizes with 0.5", directory, key, values)


def resolve_vision_tower(
    reference: str | None, base_dir: Path | None, *, is_override: bool = False
) -> ResolvedVisionTower:
    """Resolve a tower reference to an architecture: local directory first, then a known hub name.

    Args:
        reference: ``mm_vision_tower`` from config.json, or the user's ``vision_tower=`` override.
        base_dir: the checkpoint folder (relative references resolve against it).
        is_override: True for a user override (then a relative path may also be relative to the cwd).

    Raises:
        ValueError: when the reference is neither a local SigLIP directory nor a known name.
    """
    if not reference:
        raise ValueError(
            f"the checkpoint config names no vision tower (mm_vision_tower); {VISION_OVERRIDE_HINT}"
        )
    local = find_local_tower_dir(reference, base_dir, allow_cwd=is_override)
    if local is not None:
        return ResolvedVisionTower(vision_config_from_dir(local), local, f"local directory {local}")
    if is_override:
        raise ValueError(f"vision_tower={reference!r} is not an existing directory; {VISION_OVERRIDE_HINT}")
    preset = KNOWN_VISION_TOWERS.get(reference)
    if preset is not None:
        raw = load_preset(preset)
        config = SiglipVisionConfig(**{k: raw[k] for k in VISION_FIELDS if k in raw})
        return ResolvedVisionTower(config, None, f"built-in preset {preset!r}")
    raise ValueError(
        f"cannot resolve mm_vision_tower={reference!r}: it is not a local directory (absolute, or relative to "
        f"the checkpoint folder {base_dir}) nor a known name ({', '.join(KNOWN_VISION_TOWERS)}); "
        f"{VISION_OVERRIDE_HINT}"
    )


def vision_weights_from_dir(directory: Path) -> dict[str, torch.Tensor]:
    """SigLIP vision weights from a local directory, keyed as ``SiglipVisionModel``'s own state dict.

    Accepts keys with or without a ``vision_model.`` prefix; a full ``SiglipModel`` file's ``text_model.*``,
    ``logit_scale`` and ``logit_bias`` entries are ignored.

    Raises:
        ValueError: when the directory has no safetensors weights (pickle files are refused).
    """
    state = load_safetensors_dir(directory, what=f"vision tower directory {directory}")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith("text_model.") or key in ("logit_scale", "logit_bias"):
            continue
        name = key[len("vision_model.") :] if key.startswith("vision_model.") else key
        out[name] = tensor
    return out
