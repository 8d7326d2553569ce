"""Padding-free scoring: all spliced sequences of a batch packed into one row.

The padded path (``UniFilterForQualityScoring.forward``) runs the LLM on ``[B, L_max]``; here the spliced
sequences are concatenated into ``[1, T]`` with ``T = sum of lengths``, position ids restart at 0 for every sequence
and ``cu_seqlens`` ([B+1], int32) marks the boundaries. Attention then never crosses a boundary:

* ``"varlen"`` (default): our transformers attention function ``unifilter_varlen`` dispatching to the
  ``varlen_attention`` kernel registry (flash-attn > torch varlen > per-sequence SDPA reference);
* ``"flash_attention_2"``: transformers' own flash-attn integration (reads the same ``cu_seq_lens_*`` kwargs);
* ``"sdpa"`` / ``"eager"``: transformers detects the packed position ids and builds a block-diagonal causal
  mask (exact but O(T^2): a reference, not a fast path).

The score is read at each sequence's last token, so results equal the padded path (to dtype tolerance).
Also here: chunked (optionally ``torch.compile``-d) vision encoding, and :func:`auto_batch_size`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = "unifilter_varlen"  # name registered with transformers' AttentionInterface
PACKED_ATTENTIONS = ("varlen", "flash_attention_2", "sdpa", "eager")
_REGISTERED = False
_COMPILED_CHUNK = 64  # vision chunk of a compiled tower when no vision_batch_size is given


@dataclass
class PackedBatch:
    """A batch of spliced sequences concatenated into one row.

    Attributes:
        inputs_embeds: ``[1, T, H]`` text embeddings and image features, sequence after sequence.
        position_ids: ``[1, T]`` long, restarting at 0 for each sequence.
        cu_seqlens: ``[B+1]`` int32 cumulative lengths (0, l0, l0+l1, ..., T).
        max_seqlen: the longest sequence length.
        last_index: ``[B]`` long index into T of each sequence's last token (where the score is read).
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    last_index: torch.Tensor


def splice_packed(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_features: torch.Tensor | None,
    embed_tokens: nn.Module,
    image_token_index: int,
) -> PackedBatch:
    """Like ``splice_image_features`` but writes the spliced sequences back to back (no padding).

    Args:
        input_ids: ``[B, T_in]`` ids with ``image_token_index`` at image positions, right padded.
        attention_mask: ``[B, T_in]`` 1 for real tokens (a prefix of each row).
        image_features: ``[N, K, H]`` projected features, N = sentinels among the real tokens (row-major order).
        embed_tokens: the text embedding table.
        image_token_index: the sentinel id (-200).

    Returns:
        The :class:`PackedBatch`.

    Raises:
        ValueError: the mask is not right padding, a row is empty, or sentinel and image counts differ.
    """
    mask = attention_mask.to(torch.bool)
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not torch.equal(mask, positions[None, :] < lengths[:, None]):
        raise ValueError("attention_mask must be right padding: ones for the real tokens, then zeros")
    if bool((lengths == 0).any()):
        raise ValueError("every row needs at least one real token (attention_mask row of zeros)")
    is_image = (input_ids == image_token_index) & mask
    n_images = 0 if image_features is None else image_features.shape[0]
    if int(is_image.sum()) != n_images:
        raise ValueError(
            f"input_ids hold {int(is_image.sum())} image sentinels ({image_token_index}) but {n_images} images "
            "were given; pass exactly one image per sentinel, in the order the sentinels appear row by row"
        )
    k = 0 if image_features is None else image_features.shape[1]
    widths = torch.where(is_image, k, 1) * mask  # (B, T_in) tokens each input position expands to
    new_lengths = widths.sum(dim=1)  # (B,)
    row_offsets = torch.cumsum(new_lengths, dim=0) - new_lengths  # (B,)
    flat_start = row_offsets[:, None] + torch.cumsum(widths, dim=1) - widths  # (B, T_in) packed position
    total = int(new_lengths.sum())
    text_pos = mask & ~is_image
    safe_ids = torch.where(text_pos, input_ids, torch.zeros_like(input_ids))
    text_embeds = embed_tokens(safe_ids[text_pos])  # (n_text, H)
    embeds = text_embeds.new_zeros(total, text_embeds.shape[-1])
    embeds[flat_start[text_pos]] = text_embeds
    if n_images:
        cols = flat_start[is_image][:, None] + torch.arange(k, device=input_ids.device)  # (N, K)
        embeds[cols.reshape(-1)] = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
    seq_starts = torch.repeat_interleave(row_offsets, new_lengths)  # (T,)
    position_ids = torch.arange(total, device=input_ids.device) - seq_starts
    cu_seqlens = torch.zeros(len(new_lengths) + 1, dtype=torch.int32, device=input_ids.device)
    cu_seqlens[1:] = torch.cumsum(new_lengths, dim=0)
    return PackedBatch(
        inputs_embeds=embeds[None],
        position_ids=position_ids[None],
        cu_seqlens=cu_seqlens,
        max_seqlen=int(new_lengths.max()),
        last_index=(row_offsets + new_lengths - 1).long(),
    )


# ---------------------------------------------------------------------------------------------------- attention
def _varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for one packed row: ``query [1, Hq, T, D]`` -> ``[1, T, Hq, D]``."""
    from unifilter_core.kernels import get_kernel

    del attention_mask, dropout  # packed rows carry no mask; inference only
    cu = kwargs.get("cu_seq_lens_q")
    max_len = kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            f"{VARLEN_ATTENTION} attention needs cu_seq_lens_q and max_length_q (use packed_forward)"
        )
    if query.shape[0] != 1:
        raise ValueError(f"{VARLEN_ATTENTION} expects one packed row, got batch {query.shape[0]}")
    prefer = getattr(module.config, "_unifilter_varlen_kernel", "auto")
    kernel = get_kernel("varlen_attention", prefer, query.device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, H, D)
    out = kernel(q, k, v, cu, int(max_len), scale=scaling, causal=getattr(module, "is_causal", True))
    return out[None], None


def register_varlen_attention() -> None:
    """Register ``unifilter_varlen`` with transformers' ``AttentionInterface`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_attention_forward)
    _REGISTERED = True


@contextlib.contextmanager
def _attention_of(config: Any, implementation: str, kernel: str) -> Iterator[None]:
    """Temporarily switch a text config's attention implementation (and our varlen kernel preference)."""
    old_impl = config._attn_implementation
    old_kernel = getattr(config, "_unifilter_varlen_kernel", "auto")
    config._attn_implementation = implementation
    config._unifilter_varlen_kernel = kernel
    try:
        yield
    finally:
        config._attn_implementation = old_impl
        config._unifilter_varlen_kernel = old_kernel


def _resolve_attention(attention: str) -> tuple[str, str]:
    """``"varlen"``, ``"varlen:<kernel>"``, ``"flash_attention_2"``, ``"sdpa"``, ``"eager"`` -> (impl, kernel)."""
    name, _, kernel = attention.partition(":")
    if name not in PACKED_ATTENTIONS:
        raise ValueError(
            f"packed attention must be one of {PACKED_ATTENTIONS} (or 'varlen:<kernel>'), got {attention!r}"
        )
    if name == "varlen":
        register_varlen_attention()
        return VARLEN_ATTENTION, kernel or "auto"
    return name, "auto"


# ---------------------------------------------------------------------------------------------------- vision
def compile_vision_tower(model: nn.Module, mode: str | None = "default") -> bool:
    """``torch.compile`` the vision tower's embeddings and encoder in place (state-dict keys unchanged).

    torch's automatic dynamic shapes apply: a second image-batch size recompiles once with a dynamic batch
    dimension, after which any chunk size reuses that graph.

    Args:
        model: a ``UniFilterForQualityScoring``.
        mode: a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``,
            ``"max-autotune-no-cudagraphs"``); None or ``"none"`` does nothing.

    Returns:
        True when compiled.
    """
    if mode in (None, "none", ""):
        return False
    tower = model.model.vision_tower
    tower.embeddings.compile(mode=None if mode == "default" else mode)
    tower.encoder.compile(mode=None if mode == "default" else mode)
    model._unifilter_vision_compiled = True  # chunks are then padded to few distinct shapes
    logger.info("compiled the vision tower (mode %s)", mode)
    return True


def uncompile_vision_tower(model: nn.Module) -> None:
    """Undo :func:`compile_vision_tower` (the modules run eagerly again)."""
    tower = model.model.vision_tower
    for module in (tower.embeddings, tower.encoder):
        module._compiled_call_impl = None
    model._unifilter_vision_compiled = False


def _chunk_shapes(n: int, chunk: int, compiled: bool) -> list[tuple[int, int]]:
    """(start, padded size) of each vision chunk; compiled towers see only ``chunk`` or powers of two."""
    out = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        if compiled and size < chunk:
            size = min(chunk, 1 << (size - 1).bit_length())
        out.append((start, size))
    return out


def encode_images_chunked(
    model: nn.Module, pixel_values: torch.Tensor, vision_batch_size: int | None = None
) -> torch.Tensor:
    """``model.encode_images`` over chunks of at most ``vision_batch_size`` images.

    Args:
        model: a ``UniFilterForQualityScoring``.
        pixel_values: ``[N, 3, H, W]``.
        vision_batch_size: images per tower call (None = all at once). With a compiled tower the last chunk is
            zero-padded to a power of two so that only a few shapes are ever compiled.

    Returns:
        ``[N, num_image_tokens, text_hidden]``.
    """
    n = pixel_values.shape[0]
    compiled = bool(getattr(model, "_unifilter_vision_compiled", False))
    if not compiled and (vision_batch_size is None or vision_batch_size >= n):
        return model.encode_images(pixel_values)
    parts = []
    for start, size in _chunk_shapes(n, vision_batch_size or _COMPILED_CHUNK, compiled):
        chunk = pixel_values[start : start + size]
        real = chunk.shape[0]
        if real < size:
            chunk = torch.cat([chunk, chunk.new_zeros(size - real, *chunk.shape[1:])])
        parts.append(model.encode_images(chunk)[:real])
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------------- forward
def packed_forward(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor | None,
    *,
    attention: str = "varlen",
    vision_batch_size: int | None = None,
) -> torch.Tensor:
    """Score a right-padded batch with the LLM run on one packed row.

    Args:
        model: a ``UniFilterForQualityScoring``.
        input_ids: ``[B, T_in]`` long with image sentinels, right padded.
        attention_mask: ``[B, T_in]`` from lengths.
        pixel_values: ``[N, 3, H, W]`` in sentinel order, or None.
        attention: ``"varlen"`` (kernel registry; ``"varlen:<kernel>"`` forces one), ``"flash_attention_2"``,
            ``"sdpa"`` or ``"eager"`` (block-diagonal masks built by transformers; reference only).
        vision_batch_size: images per vision-tower call (None = all at once).

    Returns:
        ``[B, num_labels]`` float32 logits, equal to ``model(...).logits`` of the padded path.
    """
    implementation, kernel = _resolve_attention(attention)
    features = None
    if pixel_values is not None and pixel_values.shape[0]:
        features = encode_images_chunked(model, pixel_values, vision_batch_size)
    lm = model.model.language_model
    packed = splice_packed(
        input_ids, attention_mask, features, lm.get_input_embeddings(), model.config.image_token_index
    )
    cu = packed.cu_seqlens
    with _attention_of(lm.config, implementation, kernel):
        out = lm(
            inputs_embeds=packed.inputs_embeds,
            position_ids=packed.position_ids,
            attention_mask=None,
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=packed.max_seqlen,
            max_length_k=packed.max_seqlen,
        )
    pooled = out.last_hidden_state[0, packed.last_index]  # (B, H)
    return F.linear(pooled.float(), model.score.weight.float())


# ---------------------------------------------------------------------------------------------------- batch size
def estimate_sample_bytes(config: Any, *, tokens: int, images: int, dtype_bytes: int = 2) -> int:
    """Rough peak activation bytes one sample adds to an inference batch (weights excluded).

    Counts the largest per-layer working set of the LLM (hidden states, q/k/v, MLP gate/up/act over ``tokens``),
    and of the vision tower for ``images`` images (729 patches for so400m; attention via SDPA, no T^2 matrix).
    """
    text = config.text_config
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    kv = getattr(text, "num_key_value_heads", text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    llm = tokens * (4 * text.hidden_size + 2 * kv * head_dim + 3 * text.intermediate_size)
    tower = images * patches * (6 * vision.hidden_size + 2 * vision.intermediate_size)
    return int((llm + tower) * dtype_bytes * 1.25)  # +25% allocator slack


def auto_batch_size(
    config: Any,
    device: torch.device | str,
    *,
    tokens_per_sample: int,
    images_per_sample: float = 1.0,
    dtype_bytes: int = 2,
    memory_fraction: float = 0.7,
    min_batch: int = 1,
    max_batch: int = 512,
    cpu_default: int = 16,
) -> int:
    """A batch size that fits the free memory of ``device`` (the engine's ``batch_size="auto"``).

    Args:
        config: the model config (``text_config``, ``vision_config``).
        device: ``cuda[:i]`` uses ``torch.cuda.mem_get_info``; other devices return ``cpu_default``.
        tokens_per_sample: typical spliced length (176 for a caption with 144 image tokens; a document's longest).
        images_per_sample: average images per sample.
        dtype_bytes: 2 for bf16/fp16, 4 for fp32.
        memory_fraction: share of the currently free memory to plan for.
        min_batch: lower clamp.
        max_batch: upper clamp.
        cpu_default: returned for non-CUDA devices.

    Returns:
        A batch size in ``[min_batch, max_batch]``, rounded down to a multiple of 8 when >= 8.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return max(min_batch, min(cpu_default, max_batch))
    free, _total = torch.cuda.mem_get_info(device)
    per_sample = estimate_sample_bytes(
        config, tokens=tokens_per_sample, images=math.ceil(images_per_sample), dtype_bytes=dtype_bytes
    )
    batch = int(free * memory_fraction // max(per_sample, 1))
    if batch >= 8:
        batch -= batch % 8
    return max(min_batch, min(batch, max_batch))


def fast_varlen_available(device: torch.device | str) -> bool:
    """True when a fast (non-reference) ``varlen_attention`` kernel passes its probe on ``device``."""
    from unifilter_core.kernels import REFERENCE, get_kernel

    return get_kernel("varlen_attention", "auto", device).name != REFERENCE
