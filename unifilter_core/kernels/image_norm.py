"""Image normalisation on the device: op ``"image_normalize"``.

Ships images to the GPU as uint8 (4x fewer bytes than float32 through pinned memory and PCIe, and through the
worker-to-main-process queue) and normalises there::

    fn(images [N, H, W, C] uint8, mean: Sequence[float], std: Sequence[float], out_dtype) -> [N, C, H, W]

computing ``(x / 255 - mean_c) / std_c`` in float32 and casting to ``out_dtype``, exactly what
``UniFilterProcessor.preprocess_image`` does on the CPU (mean = std = 0.5 for SigLIP).

Implementations: ``reference`` (PyTorch, any device) and ``triton`` (one fused pass: load uint8 NHWC, write
normalised NCHW; runs on CUDA, and on CPU under ``TRITON_INTERPRET=1`` for the parity tests).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import torch

from unifilter_core.kernels.registry import REFERENCE, register_kernel

OP = "image_normalize"


def _check(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {tuple(images.shape)}")
    if len(mean) != images.shape[-1] or len(std) != images.shape[-1]:
        raise ValueError(
            f"mean/std need {images.shape[-1]} values (one per channel), got {len(mean)}/{len(std)}"
        )


def image_normalize_reference(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> ``[N, C, H, W]`` ``(x / 255 - mean) / std`` (float32 math, then ``out_dtype``)."""
    _check(images, mean, std)
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    m = torch.tensor(list(mean), dtype=torch.float32, device=images.device)[None, :, None, None]
    s = torch.tensor(list(std), dtype=torch.float32, device=images.device)[None, :, None, None]
    return ((x - m) / s).to(out_dtype).contiguous()


@functools.lru_cache(maxsize=1)
def _triton_kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def _normalize_kernel(
        src_ptr, dst_ptr, mean_ptr, std_ptr, hw, CHANNELS: tl.constexpr, BLOCK: tl.constexpr
    ):  # pragma: no cover - compiled / interpreted by triton
        image = tl.program_id(0)
        block = tl.program_id(1)
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        valid = offsets < hw
        src = src_ptr + image.to(tl.int64) * hw * CHANNELS
        dst = dst_ptr + image.to(tl.int64) * hw * CHANNELS
        for c in tl.static_range(CHANNELS):
            x = tl.load(src + offsets * CHANNELS + c, mask=valid, other=0).to(tl.float32)
            m = tl.load(mean_ptr + c)
            s = tl.load(std_ptr + c)
            y = (x / 255.0 - m) / s
            tl.store(dst + c * hw + offsets, y.to(dst_ptr.dtype.element_ty), mask=valid)

    return _normalize_kernel


def image_normalize_triton(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fused Triton version of :func:`image_normalize_reference` (one read of uint8, one write)."""
    _check(images, mean, std)
    import triton

    images = images.contiguous()
    n, h, w, c = images.shape
    out = torch.empty((n, c, h, w), dtype=out_dtype, device=images.device)
    if out.numel() == 0:
        return out
    m = torch.tensor(list(mean), dtype=torch.float32, device=images.device)
    s = torch.tensor(list(std), dtype=torch.float32, device=images.device)
    block = 1024
    grid = (n, triton.cdiv(h * w, block))
    _triton_kernel()[grid](images, out, m, s, h * w, CHANNELS=c, BLOCK=block)
    return out


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton kernels then run on CPU tensors, slowly, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_available(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU), got {device.type}"


def register() -> None:
    """Register the ``image_normalize`` implementations."""
    register_kernel(OP, REFERENCE, image_normalize_reference, description="PyTorch permute + arithmetic")
    register_kernel(
        OP,
        "triton",
        image_normalize_triton,
        available=_triton_available,
        priority=10,
        description="fused Triton",
    )
