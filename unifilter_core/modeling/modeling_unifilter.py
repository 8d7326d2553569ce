"""UniFilter quality classifier: SigLIP tower -> aapool projector -> image splicing -> Qwen body -> score head.

Module tree (our names; ``layout.py`` maps them to the released key names):
``model.vision_tower`` (SiglipVisionModel), ``model.mm_projector.mlp_projector`` (Linear, GELU, Linear),
``model.language_model`` (Qwen2Model / Qwen3Model, chosen by the text config's model_type), ``score``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel, SiglipVisionModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.utils import ModelOutput

from unifilter_core.fileio import atomic_write_text
from unifilter_core.modeling import last_token
from unifilter_core.modeling.configuration_unifilter import (
    CONFIG_NAME,
    UniFilterConfig,
    UniFilterQwen3Config,
    checkpoint_dir,
    load_checkpoint_config,
)
from unifilter_core.modeling.layout import (
    RELEASED_VISION_PREFIX,
    VISION_PREFIX,
    raise_on_problems,
    released_conversions,
    to_released_key,
)
from unifilter_core.modeling.safetensors_io import WEIGHTS_NAME, save_safetensors_atomic, weight_keys
from unifilter_core.modeling.splice import splice_image_features
from unifilter_core.modeling.vision_tower import load_tower_from_folder
from unifilter_core.progress import transformers_bars

logger = logging.getLogger(__name__)


@dataclass
class QualityScoringOutput(ModelOutput):
    """Output of :class:`UniFilterForQualityScoring`.

    Attributes:
        loss: MSE (num_labels == 1) or cross-entropy (num_labels >= 2) when labels were given, else None.
        logits: ``[B, num_labels]`` float32 head outputs.
        pooled_hidden_state: ``[B, hidden]`` final-normed hidden state at each row's last real position.
        attention_mask: ``[B, L]`` mask of the spliced sequence (1 = real token).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    pooled_hidden_state: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


class AAPoolProjector(nn.Module):
    """``aapool_mlp``: adaptive average pooling of the patch grid, then Linear -> exact GELU -> Linear."""

    def __init__(self, vision_hidden: int, text_hidden: int, num_image_tokens: int) -> None:
        super().__init__()
        self.pooled_grid = math.isqrt(num_image_tokens)
        self.mlp_projector = nn.Sequential(
            nn.Linear(vision_hidden, text_hidden), nn.GELU(), nn.Linear(text_hidden, text_hidden)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool and project patch features.

        Args:
            features: ``[N, P, C]`` patch tokens, P a perfect square, row-major patch order.

        Returns:
            ``[N, g*g, text_hidden]`` with g = sqrt(num_image_tokens).
        """
        n, p, c = features.shape
        grid = math.isqrt(p)
        if grid * grid != p:
            raise ValueError(f"the tower produced {p} patch tokens, which is not a square grid")
        maps = features.transpose(1, 2).reshape(n, c, grid, grid)  # (N, C, grid, grid)
        pooled = F.adaptive_avg_pool2d(maps, self.pooled_grid)  # (N, C, g, g)
        tokens = pooled.flatten(2).transpose(1, 2)  # (N, g*g, C)
        return self.mlp_projector(tokens)


class UniFilterModel(nn.Module):
    """Container for the three parts; holds no forward logic of its own beyond calling them."""

    def __init__(self, config: UniFilterConfig) -> None:
        super().__init__()
        self.vision_tower = SiglipVisionModel(config.vision_config)
        self.mm_projector = AAPoolProjector(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.num_image_tokens
        )
        self.language_model = AutoModel.from_config(config.text_config)


def scores_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Scalar quality scores from head logits, as the original code reports them.

    Args:
        logits: ``[B, num_labels]``.

    Returns:
        ``[B]`` float32: the raw output for one label (regression), else the softmax probability of class 1
        (the original's score for classification heads; see :func:`class_outputs` for the argmax class and the
        expected level).
    """
    logits = logits.float()
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits.softmax(dim=-1)[:, 1]


def class_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a classification head (``num_labels >= 2``) reports per row.

    Args:
        logits: ``[B, num_labels]`` with ``num_labels >= 2``.

    Returns:
        ``(score, quality_class, expected_level)``: ``[B]`` float32 P(class 1), ``[B]`` long argmax class and
        ``[B]`` float32 ``sum_k k * P(class k)``.
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"class_outputs needs a head with >= 2 labels, got {logits.shape[-1]}")
    probs = logits.float().softmax(dim=-1)
    levels = torch.arange(probs.shape[-1], device=probs.device, dtype=torch.float32)
    return probs[:, 1], probs.argmax(dim=-1), (probs * levels).sum(dim=-1)


class UniFilterForQualityScoring(PreTrainedModel):
    """The UniFilter quality classifier (``llava_qwen``: Qwen2 body).

    Load with :meth:`from_pretrained` (released layout or our saves, no network); save with
    :meth:`save_pretrained` (released layout).
    """

    config_class = UniFilterConfig
    config: UniFilterConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["SiglipEncoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer"]
    _keep_in_fp32_modules_strict = ["score"]  # the head stays float32 under bf16 and fp16 loads
    accepts_loss_kwargs = False  # the loss is a plain mean over rows

    def __init__(self, config: UniFilterConfig) -> None:
        super().__init__(config)
        self.model = UniFilterModel(config)
        self.score = nn.Linear(config.text_config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.language_model.set_input_embeddings(value)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's patch features at ``vision_select_layer`` (what the projector pools).

        Args:
            pixel_values: ``[N, 3, H, W]`` normalized images (H = W = vision image_size).

        Returns:
            ``[N, num_patches, vision_hidden]``, patches in row-major order.
        """
        tower = self.model.vision_tower
        pixel_values = pixel_values.to(dtype=tower.embeddings.patch_embedding.weight.dtype)
        if self.config.vision_select_layer == -1:
            # hidden_states[-1] is the encoder output before post_layernorm: skip the unused head
            embeddings = tower.embeddings(pixel_values)  # (N, P, C)
            return tower.encoder(inputs_embeds=embeddings).last_hidden_state
        outputs = tower(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.config.vision_select_layer]

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Project images to LLM input vectors.

        Args:
            pixel_values: ``[N, 3, H, W]`` normalized images (H = W = vision image_size).

        Returns:
            ``[N, num_image_tokens, text_hidden]``.
        """
        return self.model.mm_projector(self.vision_features(pixel_values))

    def scores_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, num_labels]`` logits -> ``[B]`` float32 scores (see :func:`scores_from_logits`)."""
        return scores_from_logits(logits)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        last_token_only: bool = False,
        **kwargs: Any,
    ) -> QualityScoringOutput:
        """Score a batch.

        Args:
            input_ids: ``[B, T]`` long, right padded, with ``image_token_index`` (-200) at image positions.
            attention_mask: ``[B, T]``; all ones when omitted.
            pixel_values: ``[N, 3, H, W]`` for the N sentinels, in the order they appear row by row.
            labels: ``[B]`` float levels (num_labels == 1) or class ids (num_labels >= 2).
            last_token_only: run the last decoder layer on each row's last token only (what the head reads;
                :mod:`unifilter_core.modeling.last_token`), where the body supports it; the logits are the same
                to float rounding. The scorer and stage-2 training pass True; the default is the full forward.

        Returns:
            :class:`QualityScoringOutput` with float32 ``logits`` ``[B, num_labels]``.
        """
        kwargs.pop("num_items_in_batch", None)  # passed by transformers' Trainer; the loss is a plain mean
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_features = self.encode_images(pixel_values) if pixel_values is not None else None
        embed = self.get_input_embeddings()
        inputs_embeds, mask = splice_image_features(
            input_ids, attention_mask, image_features, embed, self.config.image_token_index
        )
        batch, length = mask.shape
        position_ids = torch.arange(length, device=mask.device)[None, :].expand(batch, -1)
        last = mask.sum(dim=1).long() - 1
        if bool((last < 0).any()):
            raise ValueError("every row needs at least one real token (attention_mask row of zeros)")
        lm = self.model.language_model
        if last_token_only and not kwargs and last_token.supports_last_token(self):
            pooled = last_token.last_token_hidden(lm, inputs_embeds, position_ids, last)  # (B, H)
        else:
            outputs = lm(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=False,
                **kwargs,
            )
            hidden = outputs.last_hidden_state  # (B, L, H), already final-normed
            pooled = hidden[torch.arange(batch, device=hidden.device), last]  # (B, H)
        logits = F.linear(pooled.float(), self.score.weight.float())  # (B, num_labels), head in fp32
        loss = self._loss(logits, labels) if labels is not None else None
        return QualityScoringOutput(loss=loss, logits=logits, pooled_hidden_state=pooled, attention_mask=mask)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(logits.device)
        if self.config.num_labels == 1:
            return F.mse_loss(logits[:, 0], labels.float())
        return F.cross_entropy(logits, labels.long())

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        vision_tower: str | None = None,
        **kwargs: Any,
    ) -> UniFilterForQualityScoring:
        """Load a checkpoint directory (released layout or our saves) with transformers' loader; no network.

        The released key names are renamed by the conversion mapping registered for both model types
        (``layout.released_conversions``), so every ``from_pretrained`` option of transformers works
        (``device_map``, ``dtype``, ``attn_implementation``, ...). Loading is strict: a missing or unexpected key
        or a shape mismatch raises. A checkpoint without tower weights takes them from the local SigLIP folder
        ``mm_vision_tower`` (or ``vision_tower=``) names.

        Args:
            pretrained_model_name_or_path: an existing local checkpoint directory.
            vision_tower: a local SigLIP directory to take the tower architecture/weights from when the
                checkpoint lacks them (overrides ``mm_vision_tower``).
            **kwargs: transformers' options; ``torch_dtype``/``dtype`` default float32 (the score head stays
                fp32), ``attn_implementation`` defaults to ``"sdpa"``. ``trust_remote_code`` is refused.

        Returns:
            The model in eval mode; its class follows the checkpoint's ``model_type``.

        Raises:
            ValueError: the directory, its config or its weights are unusable (the message says which and why).
        """
        if model_args:
            raise TypeError("from_pretrained takes no positional arguments besides the path")
        if kwargs.pop("trust_remote_code", None):
            raise ValueError(
                "trust_remote_code is never used: UniFilter models are built from this package's code"
            )
        config = kwargs.pop("config", None)
        if isinstance(config, UniFilterConfig):
            directory = checkpoint_dir(pretrained_model_name_or_path)
        else:
            config = load_checkpoint_config(pretrained_model_name_or_path, vision_tower=vision_tower)
            directory = Path(pretrained_model_name_or_path)
        stored = weight_keys(directory, what=f"checkpoint {directory}")  # broken files fail before any build
        torch_dtype, dtype = kwargs.pop("torch_dtype", None), kwargs.pop("dtype", None)
        dtype = resolve_dtype(torch_dtype if torch_dtype is not None else dtype)
        kwargs.setdefault("attn_implementation", "sdpa")
        wants_info = kwargs.pop("output_loading_info", False)
        for option in ("local_files_only", "use_safetensors", "ignore_mismatched_sizes"):
            kwargs.pop(option, None)
        model_cls = MODEL_CLASSES[config.model_type]
        with transformers_bars():  # no "Loading weights" bar in logs, CI or Dagster runs
            model, info = super(UniFilterForQualityScoring, model_cls).from_pretrained(
                str(directory),
                config=config,
                dtype=dtype,
                local_files_only=True,
                use_safetensors=True,
                ignore_mismatched_sizes=True,  # reported below as one ValueError in released names
                output_loading_info=True,
                **kwargs,
            )
        mismatched = info["mismatched_keys"]
        missing = set(info["missing_keys"]) - {key for key, *_ in mismatched}
        if not any(key.startswith(RELEASED_VISION_PREFIX) for key in stored):
            reference = vision_tower if vision_tower is not None else config.mm_vision_tower
            load_tower_from_folder(
                model.model.vision_tower, reference, directory, is_override=vision_tower is not None
            )
            missing = {key for key in missing if not key.startswith(VISION_PREFIX)}
        raise_on_problems(
            source=str(directory), missing=missing, unexpected=info["unexpected_keys"], mismatched=mismatched
        )
        model.eval()
        return (model, info) if wants_info else model

    def save_pretrained(  # type: ignore[override]
        self, save_directory: str | Path, *, include_vision_weights: bool = True, **kwargs: Any
    ) -> None:
        """Write ``config.json`` (released flat layout + ``vision_config``) and ``model.safetensors`` (released
        key names), each to a temporary name and renamed into place.

        Args:
            save_directory: created if missing.
            include_vision_weights: False leaves the tower weights out (they then come from ``mm_vision_tower``).
            **kwargs: accepted for compatibility with transformers callers (e.g. Trainer); only
                ``state_dict`` is used.
        """
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = kwargs.get("state_dict")
        state = self.state_dict() if state is None else state
        tensors = {
            to_released_key(key): tensor
            for key, tensor in state.items()
            if include_vision_weights or not key.startswith(VISION_PREFIX)
        }
        save_safetensors_atomic(tensors, directory / WEIGHTS_NAME)
        config = self.config.to_dict()
        config["dtype"] = str(self.get_input_embeddings().weight.dtype).removeprefix("torch.")
        config.pop("_name_or_path", None)
        atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=False) + "\n")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A ``torch_dtype=`` option as a floating dtype; None and ``"auto"`` mean float32."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"torch_dtype={dtype!r} is not a floating dtype (use float32, bfloat16 or float16)")
    return resolved


class UniFilterQwen3ForQualityScoring(UniFilterForQualityScoring):
    """UniFilter with a Qwen3 body (``llava_qwen3``); identical design."""

    config_class = UniFilterQwen3Config
    config: UniFilterQwen3Config


MODEL_CLASSES: dict[str, type[UniFilterForQualityScoring]] = {
    UniFilterConfig.model_type: UniFilterForQualityScoring,
    UniFilterQwen3Config.model_type: UniFilterQwen3ForQualityScoring,
}

for _model_type in MODEL_CLASSES:
    register_checkpoint_conversion_mapping(_model_type, released_conversions(), overwrite=True)
