"""Variable-length (packed) causal attention: op ``"varlen_attention"``.

All sequences of a batch are concatenated along the token axis; ``cu_seqlens`` ([B+1], int32, starting at 0)
marks where each one starts. Every implementation has the signature::

    fn(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], cu_seqlens [B+1] int32, max_seqlen: int, *,
       scale: float | None = None, causal: bool = True) -> [T, Hq, D]

with Hq a multiple of Hkv (grouped-query attention). Implementations:

* ``reference``: one PyTorch SDPA call per sequence (exact, any device and dtype);
* ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16; torch >= 2.10);
* ``flash_attn``: ``flash_attn.flash_attn_varlen_func`` (CUDA, fp16/bf16; needs the flash-attn package).

The fast ones are accepted on a device only after a tiny parity probe against the reference passes there.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F

from unifilter_core.kernels.registry import REFERENCE, register_kernel

logger = logging.getLogger(__name__)

OP = "varlen_attention"
_HALF = (torch.float16, torch.bfloat16)


def _repeat_kv(k: torch.Tensor, groups: int) -> torch.Tensor:
    """``[T, Hkv, D] -> [T, Hkv * groups, D]`` (each kv head serves ``groups`` consecutive query heads)."""
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Exact packed attention: SDPA on each sequence separately.

    Args:
        q: ``[T, Hq, D]`` queries of all sequences, concatenated.
        k: ``[T, Hkv, D]`` keys.
        v: ``[T, Hkv, D]`` values.
        cu_seqlens: ``[B+1]`` int32 sequence boundaries (0, l0, l0+l1, ..., T).
        max_seqlen: longest sequence (unused here; part of the op signature).
        scale: softmax scale; None = 1/sqrt(D).
        causal: causal masking inside each sequence.

    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype.
    """
    del max_seqlen
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end <= start:
            continue
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)
        out[start:end] = oi.transpose(0, 1)
    return out


def varlen_attention_block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Packed attention as ONE SDPA call with a block-diagonal (causal) mask: O(T^2), for tests only."""
    del max_seqlen
    total = q.shape[0]
    seq_id = torch.repeat_interleave(
        torch.arange(cu_seqlens.numel() - 1, device=q.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    )
    mask = seq_id[:, None] == seq_id[None, :]
    if causal:
        mask &= torch.ones(total, total, dtype=torch.bool, device=q.device).tril()
    groups = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
    )
    return out.transpose(0, 1)


# ------------------------------------------------------------------------------------------------ torch varlen
@functools.lru_cache(maxsize=1)
def _torch_varlen_fn() -> tuple[Any, frozenset[str]]:
    """The kernel and its parameter names (its signature differs between torch 2.10 and 2.11+)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (flash kernel); adapts to its 2.10 / 2.11+ signatures."""
    if q.dtype not in _HALF:
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale, causal=causal)
    fn, params = _torch_varlen_fn()
    kwargs: dict[str, Any] = {"scale": scale} if "scale" in params else {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = fn(q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), **kwargs)
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------------------------------------ flash-attn
def varlen_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """``flash_attn.flash_attn_varlen_func`` (native GQA)."""
    if q.dtype not in _HALF:
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale=scale, causal=causal)
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return flash_attn_varlen_func(
        q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), softmax_scale=scale, causal=causal
    )


# ------------------------------------------------------------------------------------------------ availability
def _probe(fn: Any, device: torch.device) -> str | None:
    """Run ``fn`` on a tiny GQA problem in bf16 on ``device`` and compare with the reference."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    lens = [5, 17, 1, 9]
    total = sum(lens)
    q = torch.randn(total, 4, 64, generator=gen).to(device, torch.bfloat16)
    k = torch.randn(total, 2, 64, generator=gen).to(device, torch.bfloat16)
    v = torch.randn(total, 2, 64, generator=gen).to(device, torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    try:
        got = fn(q, k, v, cu, max(lens), causal=True).float()
    except Exception as exc:
        return f"probe raised {type(exc).__name__}: {exc}"
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, max(lens), causal=True)
    err = float((got - want).abs().max())
    return None if err < 3e-2 else f"probe mismatch vs reference (max abs err {err:.3g})"


@functools.lru_cache(maxsize=16)
def _cuda_probe(name: str, device: str) -> str | None:
    fn = {"torch_varlen": varlen_attention_torch, "flash_attn": varlen_attention_flash}[name]
    return _probe(fn, torch.device(device))


def _torch_varlen_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.10)"
    return _cuda_probe("torch_varlen", str(device))


def _flash_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install flash-attn)"
    return _cuda_probe("flash_attn", str(device))


def register() -> None:
    """Register the ``varlen_attention`` implementations."""
    register_kernel(
        OP, REFERENCE, varlen_attention_reference, priority=0, description="per-sequence SDPA loop"
    )
    register_kernel(
        OP,
        "block_mask",
        varlen_attention_block_mask,
        priority=-1,
        description="one SDPA, block-diagonal mask",
    )
    register_kernel(
        OP,
        "torch_varlen",
        varlen_attention_torch,
        available=_torch_varlen_available,
        priority=10,
        description="torch.nn.attention.varlen.varlen_attn (CUDA flash kernel)",
    )
    register_kernel(
        OP,
        "flash_attn",
        varlen_attention_flash,
        available=_flash_available,
        priority=20,
        description="flash_attn.flash_attn_varlen_func",
    )
