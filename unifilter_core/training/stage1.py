"""Stage 1: projector pre-training with next-token loss on LLaVA-Pretrain-format captions.

The classifier has no LM head; as the released config ties word embeddings, the token embedding matrix serves as
the output projection here (nothing is added to the saved model). The loss covers the caption tokens and EOS
(BOS and the image's positions are masked). By default only the projector trains (the released recipe); the
world's randomly initialised tower and LLM are unfrozen by its preset.

Outputs in ``output_dir``: ``mm_projector.safetensors`` (released key names ``model.mm_projector.mlp_projector.*``),
``training_config.json``, ``stage1_metrics.json`` and, when the LLM or tower trained (or
``save_full_checkpoint``), the whole model in the released layout with the tokenizer files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from unifilter_core.processing import ProcessingConfig, UniFilterProcessor
from unifilter_core.training.common import (
    LengthGrouping,
    apply_freezing,
    copy_tokenizer,
    enable_gradient_checkpointing,
    is_main_process,
    load_model,
    loss_curve,
    resume_target,
    setup_torch,
    training_arguments,
    write_json_atomic,
    write_run_config,
)
from unifilter_core.training.config import Stage1Config
from unifilter_core.training.data import IGNORE_INDEX, CaptionPretrainDataset, Collator

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.safetensors"
PROJECTOR_PREFIX = "model.mm_projector."


def splice_token_labels(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_labels: torch.Tensor,
    k: int,
    image_token_index: int,
) -> torch.Tensor:
    """Token labels laid out like the spliced sequence (each image sentinel widened to ``k`` ignored positions).

    Args:
        input_ids: ``[B, T]`` ids with sentinels, right padded.
        attention_mask: ``[B, T]``.
        token_labels: ``[B, T]`` targets (``IGNORE_INDEX`` where no loss).
        k: vectors per image.
        image_token_index: the sentinel id.

    Returns:
        ``[B, L]`` long, ``IGNORE_INDEX`` on image vectors and padding (L = longest spliced row).
    """
    mask = attention_mask.bool()
    is_image = (input_ids == image_token_index) & mask
    widths = torch.where(is_image, k, 1) * mask
    starts = torch.cumsum(widths, dim=1) - widths
    out_len = int(widths.sum(dim=1).max())
    out = torch.full((input_ids.shape[0], out_len), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    text = mask & ~is_image
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    out[rows[text], starts[text]] = token_labels[text]
    return out


class CaptioningModel(nn.Module):
    """Wraps a classifier for next-token training, using the tied embedding matrix as the LM head.

    Args:
        classifier: a ``UniFilterForQualityScoring``.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        # what the Trainer's DeepSpeed integration reads to fill "auto" bucket sizes (``hidden_size``)
        self.config = classifier.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        token_labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Mean next-token cross-entropy over the unmasked targets.

        Args:
            input_ids: ``[B, T]`` with image sentinels; attention_mask ``[B, T]``; pixel_values ``[N, 3, H, W]``.
            token_labels: ``[B, T]`` targets aligned with ``input_ids`` (``IGNORE_INDEX`` where no loss).

        Returns:
            ``ModelOutput(loss=scalar, n_targets=int tensor)``.
        """
        from unifilter_core.modeling.modeling_unifilter import splice_image_features

        clf = self.classifier
        index = clf.config.image_token_index
        features = clf.encode_images(pixel_values) if pixel_values is not None else None
        embed = clf.get_input_embeddings()
        embeds, mask = splice_image_features(input_ids, attention_mask, features, embed, index)
        batch, length = mask.shape
        positions = torch.arange(length, device=mask.device)[None, :].expand(batch, -1)
        hidden = clf.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, L, H)
        if token_labels is None:
            return ModelOutput(loss=None)
        k = clf.config.num_image_tokens
        targets = splice_token_labels(input_ids, attention_mask, token_labels, k, index)[:, 1:]  # (B, L-1)
        keep = targets != IGNORE_INDEX
        logits = hidden[:, :-1][keep] @ embed.weight.T  # (n_targets, V): tied embeddings as the LM head
        loss = F.cross_entropy(logits.float(), targets[keep])
        return ModelOutput(loss=loss)


def projector_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The projector's tensors under the released key names (``model.mm_projector.mlp_projector.*``)."""
    return {
        PROJECTOR_PREFIX + k: v.detach().cpu().contiguous()
        for k, v in model.model.mm_projector.state_dict().items()
    }


def save_projector(model: nn.Module, out: Path) -> Path:
    """Write ``mm_projector.safetensors`` atomically (temporary name, fsync, rename)."""
    from unifilter_core.modeling.safetensors_io import save_safetensors_atomic

    path = out / PROJECTOR_FILE
    save_safetensors_atomic(projector_state(model), path)
    return path


def load_projector(model: nn.Module, path: str | Path) -> None:
    """Load a stage-1 ``mm_projector.safetensors`` into a classifier (strict: every key and shape must match)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    stripped = {}
    for key, value in state.items():
        if not key.startswith(PROJECTOR_PREFIX):
            raise ValueError(f"{path}: key {key!r} is not a projector key ({PROJECTOR_PREFIX}*)")
        stripped[key[len(PROJECTOR_PREFIX) :]] = value
    try:
        model.model.mm_projector.load_state_dict(stripped, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} does not fit this model's projector: {exc}") from exc


def _processor(model: Any, checkpoint: str, config: Stage1Config) -> UniFilterProcessor:
    from unifilter_core.tokenization import load_tokenizer

    pconfig = ProcessingConfig.from_model_config(
        model.config, max_length=config.max_length, caption_max_tokens=config.caption_max_tokens
    )
    return UniFilterProcessor(load_tokenizer(checkpoint), pconfig)


def train_stage1(
    config: Stage1Config, *, resume: bool | str = False, cache_images: bool | None = None
) -> Path:
    """Run stage 1 and write its outputs (see the module docstring).

    Args:
        config: the stage-1 configuration.
        resume: True to continue from the newest checkpoint in ``output_dir/checkpoints``, or a checkpoint path.
        cache_images: keep preprocessed images in memory (default: when the tower input is at most 64 px).

    Returns:
        ``output_dir``.
    """
    from transformers import Trainer

    config.validate()
    setup_torch(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(config.model_path)
    apply_freezing(model, config, freeze_head=True)
    enable_gradient_checkpointing(model, config)
    processor = _processor(model, config.model_path, config)
    cache = cache_images if cache_images is not None else processor.config.image_size <= 64
    dataset = CaptionPretrainDataset(
        processor,
        config.data_path,
        config.image_folder,
        caption_max_tokens=config.caption_max_tokens,
        cache_images=cache,
    )
    trainer_cls = type(
        "CaptioningTrainer", (LengthGrouping, Trainer), {"group_by_length": config.group_by_length}
    )
    trainer = trainer_cls(
        model=CaptioningModel(model),
        args=training_arguments(config, evaluate=False),
        train_dataset=dataset,
        data_collator=Collator(pad_token_id=processor.tokenizer.pad_token_id),
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_target(config, resume))
    wall = time.perf_counter() - start
    if is_main_process():
        _write_outputs(model, config, out, result, wall, dataset, loss_curve(trainer.state.log_history))
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
    return out


def _write_outputs(
    model: Any, config: Stage1Config, out: Path, result: Any, wall: float, dataset: Any, curve: list[dict]
) -> None:
    save_projector(model, out)
    full = config.save_full_checkpoint or not (config.freeze_llm and config.freeze_vision_tower)
    if full:
        model.save_pretrained(out)
        copy_tokenizer(config.model_path, out)
    metrics = {
        "train_loss": float(result.training_loss),
        "global_steps": int(result.global_step),
        "wall_seconds": wall,
        "full_checkpoint": full,
        "training_curve": curve,
        "data": dataset.failure_summary(),
    }
    write_json_atomic(out / "stage1_metrics.json", metrics)
    write_run_config(config, out, "stage1")
    logger.info("stage 1 done in %.1f s: loss %.4f -> %s", wall, result.training_loss, out)
