"""Kernel registry and parity of every kernel with its eager reference (CPU; Triton via TRITON_INTERPRET=1).

On a CUDA machine the same parity checks also run on the GPU (see tests/gpu/test_gpu_kernels.py).
"""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unifilter_core.kernels import (
    REFERENCE,
    get_kernel,
    image_norm,
    list_kernels,
    register_kernel,
    reset_fallback_log,
)
from unifilter_core.kernels.attention import varlen_attention_block_mask, varlen_attention_reference


def _packed_problem(lens: list[int], hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    q = torch.randn(total, hq, d, generator=gen)
    k = torch.randn(total, hkv, d, generator=gen)
    v = torch.randn(total, hkv, d, generator=gen)
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32)
    return q, k, v, cu


def _padded_attention(q, k, v, lens, causal: bool) -> torch.Tensor:
    """Independent check: pad each sequence to the longest, SDPA with a key-padding mask, unpad."""
    groups = q.shape[1] // k.shape[1]
    longest = max(lens)
    out = []
    start = 0
    for n in lens:
        pad = longest - n
        qi, ki, vi = (F.pad(t[start : start + n], (0, 0, 0, 0, 0, pad)).transpose(0, 1) for t in (q, k, v))
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        allowed = torch.zeros(longest, longest, dtype=torch.bool)
        allowed[:, :n] = True
        if causal:
            allowed &= torch.ones(longest, longest, dtype=torch.bool).tril()
        allowed[n:] = True  # padded query rows: anything finite, dropped below
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=allowed)
        out.append(oi.transpose(0, 1)[:n])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_reference_matches_padded_attention(causal: bool) -> None:
    lens = [1, 7, 3, 12]
    q, k, v, cu = _packed_problem(lens)
    want = _padded_attention(q, k, v, lens, causal)
    got = varlen_attention_reference(q, k, v, cu, max(lens), causal=causal)
    assert torch.allclose(got, want, atol=1e-5)
    block = varlen_attention_block_mask(q, k, v, cu, max(lens), causal=causal)
    assert torch.allclose(block, want, atol=1e-5)


def test_varlen_reference_does_not_leak_across_sequences() -> None:
    lens = [5, 6]
    q, k, v, cu = _packed_problem(lens)
    base = varlen_attention_reference(q, k, v, cu, 6)
    v2 = v.clone()
    v2[5:] += 100.0  # change only the second sequence
    out = varlen_attention_reference(q, k, v2, cu, 6)
    assert torch.equal(out[:5], base[:5])
    assert not torch.allclose(out[5:], base[5:])


def test_varlen_scale_is_used() -> None:
    q, k, v, cu = _packed_problem([4, 4])
    a = varlen_attention_reference(q, k, v, cu, 4, scale=0.01)
    b = varlen_attention_reference(q, k, v, cu, 4)
    assert not torch.allclose(a, b)


def test_registry_selection_and_fallback_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    reset_fallback_log()
    assert get_kernel("varlen_attention", "auto", "cpu").name == REFERENCE  # CUDA-only kernels skipped on CPU
    with caplog.at_level(logging.INFO, logger="unifilter_core.kernels.registry"):
        for _ in range(3):
            assert get_kernel("varlen_attention", "torch_varlen", "cpu").name == REFERENCE
    assert sum("torch_varlen unavailable" in r.getMessage() for r in caplog.records) == 1
    assert get_kernel("varlen_attention", "block_mask", "cpu").name == "block_mask"  # explicit test variant
    with pytest.raises(ValueError, match="unknown kernel op"):
        get_kernel("no_such_op")
    rows = {(r["op"], r["name"]): r for r in list_kernels("cpu")}
    assert rows[("varlen_attention", "flash_attn")]["unavailable"] == "needs a CUDA device"
    assert rows[("image_normalize", REFERENCE)]["unavailable"] is None


def test_broken_availability_check_falls_back() -> None:
    def broken(device: torch.device) -> str | None:
        raise RuntimeError("boom")

    register_kernel("test_op", REFERENCE, lambda x: x + 1)
    register_kernel("test_op", "fast", lambda x: x + 2, available=broken, priority=5)
    assert get_kernel("test_op", "auto").name == REFERENCE
    assert get_kernel("test_op", "fast")(1) == 2
    register_kernel("test_op", "fast", lambda x: x + 2, priority=5)
    assert get_kernel("test_op", "auto")(1) == 3


def _processing_normalize(arr: np.ndarray) -> np.ndarray:
    """What UniFilterProcessor.preprocess_image does after the resize."""
    x = arr.astype(np.float32) / np.float32(255.0)
    return ((x - np.float32(0.5)) / np.float32(0.5)).transpose(0, 3, 1, 2)


def test_image_normalize_reference_equals_processing_arithmetic() -> None:
    arr = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    got = image_norm.image_normalize_reference(torch.from_numpy(arr), [0.5] * 3, [0.5] * 3)
    assert got.shape == (3, 3, 5, 7)
    assert torch.equal(got, torch.from_numpy(_processing_normalize(arr)))
    with pytest.raises(ValueError, match="uint8"):
        image_norm.image_normalize_reference(got, [0.5] * 3, [0.5] * 3)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_image_normalize_interpreted_matches_reference(
    monkeypatch: pytest.MonkeyPatch, out_dtype: torch.dtype
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    image_norm._triton_kernel.cache_clear()  # (re)build the kernel under the interpreter
    try:
        arr = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 33, 45, 3), dtype=np.uint8))
        mean, std = [0.5, 0.4, 0.3], [0.5, 0.25, 0.2]
        assert get_kernel("image_normalize", "triton", "cpu").name == "triton"
        got = image_norm.image_normalize_triton(arr, mean, std, out_dtype)
        want = image_norm.image_normalize_reference(arr, mean, std, out_dtype)
        assert got.dtype == out_dtype and got.shape == (2, 3, 33, 45)
        if out_dtype == torch.float32:
            assert torch.allclose(got, want, atol=1e-6)
        else:  # the interpreter may round to bf16 differently: allow one bf16 ulp
            assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=1e-3)
    finally:
        image_norm._triton_kernel.cache_clear()


def test_triton_needs_cuda_or_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = image_norm._triton_available(torch.device("cpu"))
    assert reason is not None
    assert get_kernel("image_normalize", "auto", "cpu").name == REFERENCE
