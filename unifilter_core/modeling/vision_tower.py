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

from unifilter_core.modeling.layout import RELEASED_VISION_PREFIX, load_state_strict
from unifilter_core.modeling.presets import KNOWN_VISION_TOWERS, load_preset
from unifilter_core.modeling.safetensors_io import load_safetensors_dir

logger = logging.getLogger(__name__)

VISION_OVERRIDE_HINT = (
    "pass `vision_tower=<local SigLIP directory>` (a folder with config.json, preprocessor_config.json and "
    "model.safetensors, e.g. a downloaded google/siglip-so400m-patch14-384)"
)

PREPROCESSOR_NAME = "preprocessor_config.json"
DEFAULT_RESAMPLE = 3  # PIL bicubic: SiglipImageProcessor's default

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
    """Validate the tower's image-processor config against its architecture (see :func:`read_image_processor`)."""
    read_image_processor(directory / PREPROCESSOR_NAME, config.image_size)


def _number_list(raw: dict[str, Any], key: str, path: str) -> tuple[float, float, float]:
    values = raw.get(key, [0.5, 0.5, 0.5])
    if isinstance(values, (int, float)):
        values = [values] * 3
    if (
        not isinstance(values, list)
        or len(values) != 3
        or not all(isinstance(v, (int, float)) for v in values)
    ):
        raise ValueError(f"{path}: {key} must be 3 numbers (one per RGB channel), got {values!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _processor_size(raw: dict[str, Any], path: str) -> set[int]:
    size = raw.get("size")
    if size is None:
        return set()
    if isinstance(size, int):
        return {size}
    if isinstance(size, dict) and {"height", "width"} & set(size):
        return {size.get("height"), size.get("width")} - {None}
    raise ValueError(
        f"{path}: size {size!r} is not a fixed square resize ({{'height': N, 'width': N}}); UniFilter towers "
        "take fixed-size square inputs"
    )


def read_image_processor(path: Path, image_size: int) -> dict[str, Any]:
    """The preprocessing a tower's ``preprocessor_config.json`` asks for, as :class:`ProcessingConfig` fields.

    Reads ``resample`` (PIL filter id: 3 bicubic for SigLIP, 2 bilinear for SigLIP2), ``rescale_factor``
    (``do_rescale``), ``image_mean`` / ``image_std`` (``do_normalize``) and checks ``size`` against the tower's
    ``image_size``. Missing keys take the ``SiglipImageProcessor`` defaults.

    Raises:
        ValueError: the file is not a JSON object, resizes to another size than the tower takes, or does not
            resize at all.
    """
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not an image-processor config object")
    return parse_image_processor(raw, str(path), image_size)


def parse_image_processor(raw: dict[str, Any], path: str, image_size: int) -> dict[str, Any]:
    """:func:`read_image_processor` on an already-read dict (``path`` names it in messages)."""
    sizes = _processor_size(raw, path)
    if (sizes and sizes != {image_size}) or raw.get("do_resize", True) is not True:
        raise ValueError(
            f"{path} resizes to {raw.get('size')!r} (do_resize={raw.get('do_resize', True)}), but the vision "
            f"tower takes {image_size}x{image_size} images; fix the file or use the tower it belongs to"
        )
    resample = raw.get("resample", DEFAULT_RESAMPLE)
    if not isinstance(resample, int) or isinstance(resample, bool):
        raise ValueError(
            f"{path}: resample must be a PIL filter id (2 bilinear, 3 bicubic), got {resample!r}"
        )
    rescale = raw.get("rescale_factor", 1 / 255) if raw.get("do_rescale", True) else 1.0
    normalize = raw.get("do_normalize", True)
    return {
        "resample": resample,
        "rescale_factor": float(rescale),
        "image_mean": _number_list(raw, "image_mean", path) if normalize else (0.0, 0.0, 0.0),
        "image_std": _number_list(raw, "image_std", path) if normalize else (1.0, 1.0, 1.0),
    }


def image_processor_settings(config: Any, vision_tower: str | None = None) -> dict[str, Any]:
    """Preprocessing of a model's tower: the first of (1) ``vision_tower``'s, (2) the checkpoint folder's,
    (3) the local ``mm_vision_tower`` folder's ``preprocessor_config.json``, (4) the built-in preset of a known
    ``mm_vision_tower`` name, (5) SigLIP's values (bicubic, 1/255, mean = std = 0.5).

    Args:
        config: a UniFilter config (``name_or_path`` is the checkpoint folder when loaded from one).
        vision_tower: the user's tower override (a local SigLIP folder), if any.

    Returns:
        :class:`ProcessingConfig` keyword arguments (``resample``, ``rescale_factor``, ``image_mean``,
        ``image_std``) plus ``"source"``: where they came from.
    """
    size = int(config.vision_config.image_size)
    base = _base_dir(getattr(config, "name_or_path", None))
    reference = getattr(config, "mm_vision_tower", None)
    folders = [
        find_local_tower_dir(vision_tower, base, allow_cwd=True) if vision_tower else None,
        base,
        find_local_tower_dir(reference, base, allow_cwd=False) if reference else None,
    ]
    for folder in folders:
        if folder is not None and (folder / PREPROCESSOR_NAME).is_file():
            path = folder / PREPROCESSOR_NAME
            return {**read_image_processor(path, size), "source": str(path)}
    preset = KNOWN_VISION_TOWERS.get(reference or "")
    if preset is not None:
        raw = {**load_preset(preset)["image_processor"], "size": {"height": size, "width": size}}
        return {
            **parse_image_processor(raw, f"preset {preset!r}", size),
            "source": f"built-in preset {preset!r}",
        }
    return {**parse_image_processor({}, "SigLIP defaults", size), "source": "SigLIP defaults"}


def _base_dir(name_or_path: Any) -> Path | None:
    if not name_or_path:
        return None
    path = Path(str(name_or_path))
    return path if path.is_dir() else None


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


def tower_weights_folder(reference: str | None, checkpoint_dir: Path, *, is_override: bool) -> Path:
    """The local SigLIP folder to take tower weights from, for a checkpoint whose weights hold no tower (the
    released loader re-downloads it by name; we never do).

    Args:
        reference: ``mm_vision_tower`` or the user's ``vision_tower=`` override.
        checkpoint_dir: the checkpoint folder (relative references resolve against it).
        is_override: True for a user override (then a relative path may also be relative to the cwd).

    Raises:
        ValueError: ``reference`` names no local folder; the message names the ``vision_tower=`` option.
    """
    local = find_local_tower_dir(reference, checkpoint_dir, allow_cwd=is_override) if reference else None
    if local is None:
        raise ValueError(
            f"the checkpoint {checkpoint_dir} holds no vision tower weights ({RELEASED_VISION_PREFIX}*) and "
            f"mm_vision_tower={reference!r} is not a local directory; {VISION_OVERRIDE_HINT}"
        )
    logger.info("loading vision tower weights from %s", local)
    return local


def load_tower_from_folder(
    tower: torch.nn.Module, reference: str | None, checkpoint_dir: Path, *, is_override: bool
) -> None:
    """Fill a model's ``SiglipVisionModel`` strictly from :func:`tower_weights_folder`'s weights.

    Raises:
        ValueError: no local folder, or its weights do not match the tower.
    """
    local = tower_weights_folder(reference, checkpoint_dir, is_override=is_override)
    load_state_strict(tower, vision_weights_from_dir(local), source=f"vision tower directory {local}")
