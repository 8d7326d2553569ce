"""UniFilter configuration: a SigLIP vision sub-config, a Qwen2 (or Qwen3) text sub-config and projector fields.

In memory the config is composite (``vision_config``, ``text_config``). On disk it uses the RELEASED layout: the
text config's fields flat at the top level, the LLaVA ``mm_*`` keys, ``architectures ["LlavaQwenClassifier"]``,
plus (in our own saves only) a compact ``vision_config`` dict so the checkpoint is self-contained. Released
configs lack ``vision_config``; it is then resolved from ``mm_vision_tower`` (see ``vision_tower.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from transformers import PreTrainedConfig, Qwen2Config, Qwen3Config, SiglipVisionConfig

from unifilter_core.modeling.vision_tower import (
    VISION_FIELDS,
    resolve_vision_tower,
    vision_config_to_dict,
)

IMAGE_TOKEN_INDEX = -200
CONFIG_NAME = "config.json"
REPAIR_HINT = "re-download the checkpoint, or re-save it with save_pretrained (UniFilterForQualityScoring.save_pretrained)"
PROJECTOR_TYPES = ("aapool_mlp",)
ASPECT_RATIOS = ("pad", "resize")
# LLaVA's default "square" (checkpoints trained with the original code without --image_aspect_ratio pad) stretches
ASPECT_ALIASES = {"square": "resize"}
SELECT_FEATURES = ("patch",)

# released flat key -> our attribute
MM_KEY_MAP: dict[str, str] = {
    "mm_projector_type": "projector_type",
    "mm_num_image_tokens": "num_image_tokens",
    "mm_vision_select_layer": "vision_select_layer",
    "mm_vision_select_feature": "vision_select_feature",
}
# released keys with the only value this implementation supports
FIXED_MM_KEYS: dict[str, Any] = {
    "mm_patch_merge_type": "flat",
    "use_mm_proj": True,
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
}
_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(PreTrainedConfig))
_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_LEGACY_TEXT_KEYS = frozenset({"rope_theta", "rope_scaling"})


def _text_field_names(text_cls: type[PreTrainedConfig]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(text_cls)) - _BASE_FIELDS | _LEGACY_TEXT_KEYS


def _base_dir(name_or_path: Any) -> Path | None:
    if not name_or_path:
        return None
    path = Path(str(name_or_path))
    if path.is_file():
        path = path.parent
    return path if path.is_dir() else None


class UniFilterConfig(PreTrainedConfig):
    """Configuration of a UniFilter quality classifier with a Qwen2 body (``model_type`` ``llava_qwen``).

    Accepts the composite form (``vision_config=``, ``text_config=``) and the released flat form (Qwen2 fields and
    ``mm_*`` keys at the top level). Values are validated on construction.
    """

    model_type = "llava_qwen"
    released_architecture: ClassVar[str] = "LlavaQwenClassifier"
    text_config_class: ClassVar[type[PreTrainedConfig]] = Qwen2Config
    sub_configs_defaults = {"vision_config": SiglipVisionConfig, "text_config": Qwen2Config}

    vision_config: dict | PreTrainedConfig | None = None  # SigLIP vision tower architecture
    text_config: dict | PreTrainedConfig | None = None  # Qwen2 body architecture
    projector_type: str = "aapool_mlp"  # adaptive average pool -> Linear -> GELU -> Linear
    num_image_tokens: int = 144  # tokens per image after pooling (a perfect square <= patch count)
    vision_select_layer: int = -1  # index into the tower's hidden_states
    vision_select_feature: str = "patch"  # SigLIP has no CLS token: every patch token is used
    image_aspect_ratio: str = "pad"  # "pad" (grey square, as in training) or "resize" (stretch)
    tokenizer_model_max_length: int = 4096  # spliced sequences are cut to this length by the processor
    tokenizer_padding_side: str = "right"
    image_token_index: int = IMAGE_TOKEN_INDEX  # sentinel id in input_ids marking an image
    mm_vision_tower: str | None = "google/siglip-so400m-patch14-384"  # hub name or path of the tower
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise ValueError(
                f"{type(self).__name__} is for model_type {self.model_type!r}, got {model_type!r}; load the "
                "checkpoint with UniFilterForQualityScoring.from_pretrained or AutoConfig, which dispatch on it"
            )
        for flat, attr in MM_KEY_MAP.items():
            if flat in kwargs:
                setattr(self, attr, kwargs.pop(flat))
        fixed = {key: kwargs.pop(key) for key in FIXED_MM_KEYS if key in kwargs}
        if isinstance(self.image_aspect_ratio, str):
            self.image_aspect_ratio = ASPECT_ALIASES.get(self.image_aspect_ratio, self.image_aspect_ratio)
        mm_hidden_size = kwargs.pop("mm_hidden_size", None)
        override = kwargs.pop("vision_tower", None)
        base_dir = _base_dir(kwargs.get("name_or_path"))
        self._build_text_config(kwargs)
        self._build_vision_config(override, base_dir)
        if "num_labels" not in kwargs and self.id2label is None:
            kwargs["num_labels"] = 1
        super().__post_init__(**kwargs)
        self._validate(fixed, mm_hidden_size)

    def _build_text_config(self, kwargs: dict[str, Any]) -> None:
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in _text_field_names(self.text_config_class)}
        text = self.text_config
        if isinstance(text, PreTrainedConfig):
            if not isinstance(text, self.text_config_class):
                raise ValueError(
                    f"{type(self).__name__} needs a {self.text_config_class.__name__} text_config, got "
                    f"{type(text).__name__}"
                )
        else:
            merged = {**flat, **{k: v for k, v in (text or {}).items() if k != "model_type"}}
            for key in _TOKEN_FIELDS:
                if getattr(self, key) is not None:
                    merged[key] = getattr(self, key)
            text = self.text_config_class(**merged)
        for key in _TOKEN_FIELDS:  # keep top-level and text-level special ids in sync
            if getattr(self, key) is None:
                setattr(self, key, getattr(text, key, None))
            else:
                setattr(text, key, getattr(self, key))
        self.text_config = text

    def _build_vision_config(self, override: str | None, base_dir: Path | None) -> None:
        vision = self.vision_config
        if isinstance(vision, dict):
            unknown = set(vision) - set(VISION_FIELDS) - {"model_type"}
            kwargs = {k: vision[k] for k in VISION_FIELDS if k in vision}
            if unknown:
                kwargs.update(
                    {k: vision[k] for k in unknown if k in SiglipVisionConfig.default_config_fields()}
                )
            vision = SiglipVisionConfig(**kwargs)
        elif vision is None:
            reference = override if override is not None else self.mm_vision_tower
            vision = resolve_vision_tower(reference, base_dir, is_override=override is not None).config
        elif not isinstance(vision, SiglipVisionConfig):
            raise ValueError(
                f"vision_config must be a SiglipVisionConfig or dict, got {type(vision).__name__}"
            )
        self.vision_config = vision

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, pretrained_model_name_or_path: str | Path, *, vision_tower: str | None = None, **kwargs: Any
    ) -> UniFilterConfig:
        """Read a local checkpoint's config.json (no network); ``vision_tower`` as in the model loader.

        Raises:
            ValueError: when the directory is missing or its ``model_type`` belongs to another config class.
        """
        if kwargs.get("trust_remote_code"):
            raise ValueError("trust_remote_code is never used: UniFilter configs are built from this package")
        config = load_checkpoint_config(pretrained_model_name_or_path, vision_tower=vision_tower)
        if not isinstance(config, cls):
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {config.model_type!r} checkpoint, not {cls.model_type!r}"
            )
        return config

    @property
    def num_patches(self) -> int:
        """Patch tokens per image produced by the tower: ``(image_size // patch_size) ** 2``."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return grid * grid

    def _validate(self, fixed: dict[str, Any], mm_hidden_size: int | None) -> None:
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"projector_type={self.projector_type!r} is not supported; use one of {PROJECTOR_TYPES}"
            )
        n = self.num_image_tokens
        if not isinstance(n, int) or n <= 0 or math.isqrt(n) ** 2 != n:
            raise ValueError(f"num_image_tokens={n!r} must be a positive perfect square (e.g. 144 = 12x12)")
        if n > self.num_patches:
            raise ValueError(
                f"num_image_tokens={n} exceeds the {self.num_patches} patches of the vision tower "
                f"(image_size {self.vision_config.image_size} / patch_size {self.vision_config.patch_size}); "
                "pooling cannot upsample"
            )
        layers = self.vision_config.num_hidden_layers
        if (
            not isinstance(self.vision_select_layer, int)
            or not -(layers + 1) <= self.vision_select_layer <= layers
        ):
            raise ValueError(
                f"vision_select_layer={self.vision_select_layer!r} is outside the tower's {layers + 1} hidden states"
            )
        if self.vision_select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"vision_select_feature={self.vision_select_feature!r}; supported: {SELECT_FEATURES}"
            )
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio={self.image_aspect_ratio!r}; use one of {ASPECT_RATIOS} "
                f"(or {', '.join(ASPECT_ALIASES)}, read as {', '.join(ASPECT_ALIASES.values())})"
            )
        if not isinstance(self.tokenizer_model_max_length, int) or self.tokenizer_model_max_length <= 0:
            raise ValueError(
                f"tokenizer_model_max_length={self.tokenizer_model_max_length!r} must be a positive int"
            )
        if self.tokenizer_padding_side != "right":
            raise ValueError(
                f"tokenizer_padding_side={self.tokenizer_padding_side!r}; only 'right' is supported"
            )
        if not isinstance(self.image_token_index, int) or self.image_token_index >= 0:
            raise ValueError(
                f"image_token_index={self.image_token_index!r} must be a negative sentinel id (-200)"
            )
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(f"num_labels={self.num_labels!r} must be >= 1 (1 = regression head)")
        for key, value in fixed.items():
            if value != FIXED_MM_KEYS[key]:
                raise ValueError(f"{key}={value!r} is not supported; only {FIXED_MM_KEYS[key]!r} is")
        if mm_hidden_size is not None and mm_hidden_size != self.vision_config.hidden_size:
            raise ValueError(
                f"mm_hidden_size={mm_hidden_size} disagrees with the vision tower hidden size "
                f"{self.vision_config.hidden_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The released flat layout plus our ``vision_config`` dict (JSON-ready)."""
        nested = super().to_dict()
        text = nested.pop("text_config")
        nested.pop("vision_config")
        names = _text_field_names(self.text_config_class)
        out: dict[str, Any] = {"architectures": [self.released_architecture], "model_type": self.model_type}
        out.update({k: v for k, v in text.items() if k in names})
        rope = text.get("rope_parameters") or {}
        if "rope_theta" in rope:  # legacy key, read by transformers 4.x and the original code
            out["rope_theta"] = rope["rope_theta"]
        for key, value in nested.items():
            if key in ("architectures", "model_type") or key in MM_KEY_MAP.values():
                continue
            if key == "image_token_index" and value == IMAGE_TOKEN_INDEX:
                continue  # fixed by the format, not written in released configs
            out[key] = value
        out["num_labels"] = self.num_labels
        out["mm_hidden_size"] = self.vision_config.hidden_size
        out.update({flat: getattr(self, attr) for flat, attr in MM_KEY_MAP.items()})
        out.update(FIXED_MM_KEYS)
        out["vision_config"] = vision_config_to_dict(self.vision_config)
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Always the full flat layout (a diff against defaults would drop released keys)."""
        return self.to_dict()


class UniFilterQwen3Config(UniFilterConfig):
    """UniFilter with a Qwen3 body and a SigLIP2 so400m tower (``model_type`` ``llava_qwen3``)."""

    model_type = "llava_qwen3"
    released_architecture: ClassVar[str] = "LlavaQwen3Classifier"
    text_config_class: ClassVar[type[PreTrainedConfig]] = Qwen3Config
    sub_configs_defaults = {"vision_config": SiglipVisionConfig, "text_config": Qwen3Config}

    mm_vision_tower: str | None = "google/siglip2-so400m-patch14-384"


CONFIG_CLASSES: dict[str, type[UniFilterConfig]] = {
    UniFilterConfig.model_type: UniFilterConfig,
    UniFilterQwen3Config.model_type: UniFilterQwen3Config,
}


def config_class_for(model_type: str | None) -> type[UniFilterConfig]:
    """The config class registered for a checkpoint's ``model_type`` (never guessed from a name)."""
    try:
        return CONFIG_CLASSES[str(model_type)]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not a UniFilter checkpoint; supported: {', '.join(CONFIG_CLASSES)}"
        ) from None


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
        ids = {name: getattr(config, name, None) for name in _TOKEN_FIELDS}
    for name, value in ids.items():
        values = value if isinstance(value, list) else [value]
        bad = [v for v in values if v is not None and not 0 <= int(v) < vocab]
        if bad:
            where = Path(config.name_or_path) / CONFIG_NAME if config.name_or_path else "the config"
            raise ValueError(
                f"{source}: {name}={value} does not fit vocab_size={vocab} of {where} (ids must be "
                f"0..{vocab - 1}); the config and the tokenizer disagree: {REPAIR_HINT}"
            )


def checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as an existing local directory (models are never downloaded).

    Raises:
        ValueError: it is not an existing directory.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist (models are never downloaded)")
    return directory


def load_checkpoint_config(
    path: str | os.PathLike[str], *, vision_tower: str | None = None
) -> UniFilterConfig:
    """Read ``config.json`` of a checkpoint directory into the config class its ``model_type`` names.

    Args:
        path: an existing checkpoint directory.
        vision_tower: optional local SigLIP directory used when config.json has no ``vision_config``.

    Raises:
        ValueError: when the directory or config.json does not exist, or the config is invalid.
    """
    directory = checkpoint_dir(path)
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
