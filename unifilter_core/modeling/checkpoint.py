"""Released checkpoint layout <-> our model objects.

Key mapping (released name <-> our module name), explicit and strict:

=================================================  ==========================================
released                                           ours
=================================================  ==========================================
``model.vision_tower.vision_tower.vision_model.X``  ``model.vision_tower.X`` (SiglipVisionModel)
``model.mm_projector.mlp_projector.{0,2}.*``        same
``model.X`` (embed_tokens, layers, norm)            ``model.language_model.X``
``score.weight``                                    same
=================================================  ==========================================

Any key outside this table, any missing key and any shape mismatch raise ``ValueError``: a silently random
tower would still produce plausible-looking scores.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from transformers.initialization import no_init_weights

from unifilter_core.modeling.configuration_unifilter import UniFilterConfig, config_class_for
from unifilter_core.modeling.modeling_unifilter import MODEL_CLASSES, UniFilterForQualityScoring
from unifilter_core.modeling.safetensors_io import WEIGHTS_NAME, load_safetensors_dir, save_safetensors_atomic
from unifilter_core.modeling.vision_tower import (
    VISION_OVERRIDE_HINT,
    find_local_tower_dir,
    vision_weights_from_dir,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
RELEASED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
VISION_PREFIX = "model.vision_tower."
LANGUAGE_PREFIX = "model.language_model."
PROJECTOR_PREFIX = "model.mm_projector."
SCORE_KEY = "score.weight"
REPAIR_HINT = "re-download the checkpoint, or re-save it with save_pretrained (UniFilterForQualityScoring.save_pretrained)"
# Options the Auto classes / hub callers pass along that mean nothing for a local, offline load.
_IGNORED_LOAD_OPTIONS = frozenset(
    {"_from_auto", "_from_pipeline", "revision", "cache_dir", "local_files_only", "token", "force_download",
     "proxies", "subfolder", "use_safetensors", "low_cpu_mem_usage", "code_revision", "adapter_kwargs"}
)  # fmt: skip


def to_released_key(key: str) -> str:
    """Our state-dict key -> the released checkpoint's key."""
    if key.startswith(VISION_PREFIX):
        return RELEASED_VISION_PREFIX + key[len(VISION_PREFIX) :]
    if key.startswith(PROJECTOR_PREFIX) or key == SCORE_KEY:
        return key
    if key.startswith(LANGUAGE_PREFIX):
        return "model." + key[len(LANGUAGE_PREFIX) :]
    raise ValueError(f"state-dict key {key!r} has no place in the released layout")


def from_released_key(key: str) -> str | None:
    """The released checkpoint's key -> our key, or None when the key has no place in the model."""
    if key.startswith(RELEASED_VISION_PREFIX):
        return VISION_PREFIX + key[len(RELEASED_VISION_PREFIX) :]
    if key.startswith(PROJECTOR_PREFIX) or key == SCORE_KEY:
        return key
    if key.startswith("model.vision_tower."):
        return None  # a tower stored under some other prefix: not the released layout
    if key.startswith("model."):
        return LANGUAGE_PREFIX + key[len("model.") :]
    return None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"torch_dtype={dtype!r} is not a floating dtype (use float32, bfloat16 or float16)")
    return resolved


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _check_options(extra: Mapping[str, Any]) -> None:
    if extra.get("trust_remote_code"):
        raise ValueError(
            "trust_remote_code is never used: UniFilter models are built from this package's code"
        )
    if extra.get("device_map") not in (None, "cpu"):
        raise ValueError("device_map is not supported; load on CPU, then call model.to(device)")
    unknown = set(extra) - _IGNORED_LOAD_OPTIONS - {"trust_remote_code", "device_map"}
    if unknown:
        raise TypeError(f"unexpected from_pretrained options: {', '.join(sorted(unknown))}")


def load_config(path: str | os.PathLike[str], *, vision_tower: str | None = None) -> UniFilterConfig:
    """Read ``config.json`` of a checkpoint directory into the config class its ``model_type`` names.

    Args:
        path: an existing checkpoint directory.
        vision_tower: optional local SigLIP directory used when config.json has no ``vision_config``.

    Raises:
        ValueError: when the directory or config.json does not exist, or the config is invalid.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist (models are never downloaded)")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}; it is not a UniFilter checkpoint directory")
    raw = read_config_json(config_path)
    config_cls = config_class_for(raw.get("model_type"))
    if vision_tower is not None and "vision_config" not in raw:
        raw["vision_tower"] = vision_tower
    config = config_cls(**raw, name_or_path=str(directory))
    check_special_ids(config, source=str(config_path))
    return config


def read_config_json(path: Path) -> dict[str, Any]:
    """The JSON object in a checkpoint's ``config.json``.

    Raises:
        ValueError: the file cannot be read, is not JSON, or holds something other than an object; the message
            names the file and what to do.
    """
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is not a readable JSON file ({type(exc).__name__}: {exc}); {REPAIR_HINT}"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path} holds a JSON {type(raw).__name__}, not an object with the model config; {REPAIR_HINT}"
        )
    return raw


def check_special_ids(config: UniFilterConfig, *, source: str, ids: Mapping[str, Any] | None = None) -> None:
    """Refuse special token ids the embedding table cannot hold (they would fail at the first sample).

    Args:
        config: the model config (``text_config.vocab_size`` rows in the embedding).
        source: where the ids come from, for the message (``config.json`` or a tokenizer folder).
        ids: name -> id to check; default the config's pad/bos/eos ids.

    Raises:
        ValueError: an id is negative or >= ``vocab_size``.
    """
    vocab = int(config.text_config.vocab_size)
    if ids is None:
        ids = {name: getattr(config, name, None) for name in ("pad_token_id", "bos_token_id", "eos_token_id")}
    for name, value in ids.items():
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v is not None and not 0 <= int(v) < vocab]
        if bad:
            where = Path(config.name_or_path) / CONFIG_NAME if config.name_or_path else "the config"
            raise ValueError(
                f"{source}: {name}={value} does not fit vocab_size={vocab} of {where} (ids must be "
                f"0..{vocab - 1}); the config and the tokenizer disagree: {REPAIR_HINT}"
            )


def _vision_state(
    config: UniFilterConfig, directory: Path, vision_tower: str | None
) -> dict[str, torch.Tensor]:
    reference = vision_tower if vision_tower is not None else config.mm_vision_tower
    local = (
        find_local_tower_dir(reference, directory, allow_cwd=vision_tower is not None) if reference else None
    )
    if local is None:
        raise ValueError(
            f"the checkpoint {directory} holds no vision tower weights ({RELEASED_VISION_PREFIX}*) and "
            f"mm_vision_tower={reference!r} is not a local directory; {VISION_OVERRIDE_HINT}"
        )
    logger.info("loading vision tower weights from %s", local)
    return {VISION_PREFIX + k: v for k, v in vision_weights_from_dir(local).items()}


def map_released_state(
    state: Mapping[str, torch.Tensor], config: UniFilterConfig, directory: Path, vision_tower: str | None
) -> dict[str, torch.Tensor]:
    """Released-layout tensors -> our keys, adding tower weights from a SigLIP directory when absent.

    Raises:
        ValueError: on keys that have no place in the model.
    """
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        ours = from_released_key(key)
        if ours is None:
            unexpected.append(key)
        else:
            mapped[ours] = tensor
    if unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} has unexpected keys: {_preview(unexpected)}")
    if not any(k.startswith(VISION_PREFIX) for k in mapped):
        mapped.update(_vision_state(config, directory, vision_tower))
    return mapped


def _preview(keys: list[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict`` that raises ``ValueError`` on any missing key, unexpected key or shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview([to_released_key(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    shapes = [
        f"{to_released_key(k)} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"shape mismatches: {_preview(shapes)}")
    if problems:
        raise ValueError(f"weights in {source} do not match the model config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_model(
    path: str | os.PathLike[str],
    *,
    vision_tower: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    config: UniFilterConfig | None = None,
    extra: Mapping[str, Any] | None = None,
) -> UniFilterForQualityScoring:
    """Build the model a checkpoint directory describes and load its weights (see module docstring).

    Args:
        path: an existing local checkpoint directory (released layout or our saves).
        vision_tower: local SigLIP directory overriding ``mm_vision_tower``.
        torch_dtype: parameter dtype (default float32); the score head stays float32.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2``.
        config: an already-built config (the Auto classes pass one); read from the directory otherwise.
        extra: other keyword options, validated (hub options ignored, ``trust_remote_code`` refused).
    """
    _check_options(extra or {})
    directory = Path(path)
    if config is None:
        config = load_config(directory, vision_tower=vision_tower)
    elif not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist (models are never downloaded)")
    dtype = _resolve_dtype(torch_dtype)
    config._attn_implementation = attn_implementation
    model_cls = MODEL_CLASSES[config.model_type]
    state = load_safetensors_dir(directory, what=f"checkpoint {directory}")
    mapped = map_released_state(state, config, directory, vision_tower)
    with no_init_weights(), _default_dtype(dtype):
        model = model_cls(config)
    load_state_strict(model, mapped, source=str(directory))
    model.score.float()
    model.config.dtype = dtype
    model.eval()
    return model


def released_state_dict(
    model: UniFilterForQualityScoring,
    *,
    include_vision_weights: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The model's tensors under the released key names."""
    state = state_dict if state_dict is not None else model.state_dict()
    out = {}
    for key, tensor in state.items():
        if not include_vision_weights and key.startswith(VISION_PREFIX):
            continue
        out[to_released_key(key)] = tensor
    return out


def save_model(
    model: UniFilterForQualityScoring,
    save_directory: str | os.PathLike[str],
    *,
    include_vision_weights: bool = True,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``config.json`` (released flat layout + ``vision_config``) and ``model.safetensors``.

    Both files are written to temporary names and renamed into place.
    """
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = released_state_dict(model, include_vision_weights=include_vision_weights, state_dict=state_dict)
    save_safetensors_atomic(tensors, directory / WEIGHTS_NAME)
    config = model.config.to_dict()
    config["dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    config.pop("_name_or_path", None)
    tmp = directory / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, directory / CONFIG_NAME)
    return directory
