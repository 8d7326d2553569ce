"""Kernel and packing parity on a CUDA GPU (bf16), against the eager references. Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unifilter_core.kernels import REFERENCE, get_kernel, image_norm
from unifilter_core.kernels.attention import varlen_attention_reference

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _problem(lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    total = sum(lens)
    q, k, v = (torch.randn(total, h, d, generator=gen).to(DEVICE, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *np.cumsum(lens).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, cu


@pytest.mark.parametrize("name", ["torch_varlen", "flash_attn"])
def test_varlen_kernels_match_reference(name: str) -> None:
    kernel = get_kernel("varlen_attention", name, DEVICE)
    if kernel.name == REFERENCE:
        pytest.skip(f"{name} unavailable on this machine")
    lens = [176, 1, 300, 75, 2048]
    q, k, v, cu = _problem(lens, 12, 2, 128, torch.bfloat16)
    got = kernel(q, k, v, cu, max(lens), causal=True).float()
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, max(lens), causal=True)
    assert (got - want).abs().max() < 2e-2


def test_auto_varlen_kernel_is_fast_on_cuda() -> None:
    name = get_kernel("varlen_attention", "auto", DEVICE).name
    assert name in ("torch_varlen", "flash_attn"), f"no fast varlen kernel on CUDA (got {name})"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_image_normalize_matches_reference(out_dtype: torch.dtype) -> None:
    kernel = get_kernel("image_normalize", "triton", DEVICE)
    if kernel.name != "triton":
        pytest.skip("triton unavailable")
    image_norm._triton_kernel.cache_clear()
    arr = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 384, 384, 3), dtype=np.uint8)).to(
        DEVICE
    )
    got = kernel(arr, [0.5] * 3, [0.5] * 3, out_dtype).float()
    want = image_norm.image_normalize_reference(arr, [0.5] * 3, [0.5] * 3, out_dtype).float()
    assert (got - want).abs().max() <= (1e-6 if out_dtype == torch.float32 else 1e-2)


def test_packed_equals_padded_bf16_and_compiled_tower() -> None:
    from unifilter_core.modeling import load_preset
    from unifilter_core.modeling.init import build_random_model
    from unifilter_core.modeling.packing import compile_vision_tower, packed_forward

    model = build_random_model(load_preset("tiny"), seed=0).to(DEVICE, torch.bfloat16).eval()
    lens = [4, 12, 7, 2, 9]
    gen = torch.Generator().manual_seed(1)
    ids = torch.full((len(lens), max(lens)), 599)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lens):
        ids[row, :n] = torch.randint(0, 590, (n,), generator=gen)
        ids[row, 1] = -200
        mask[row, :n] = 1
    pixels = torch.randn(len(lens), 3, 32, 32, generator=gen).to(DEVICE, torch.bfloat16)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = packed_forward(model, ids, mask, pixels)
        assert (got - want).abs().max() < 5e-2 * max(1.0, float(want.abs().max()))
        compile_vision_tower(model, "default")
        compiled = packed_forward(model, ids, mask, pixels, vision_batch_size=4)
        assert (compiled - got).abs().max() < 5e-2 * max(1.0, float(got.abs().max()))


def test_auto_batch_size_on_cuda() -> None:
    from unifilter_core.modeling import load_preset
    from unifilter_core.modeling.configuration_unifilter import config_class_for
    from unifilter_core.modeling.packing import auto_batch_size

    flat = load_preset("released-qwen2.5-1.5b")
    config = config_class_for(flat["model_type"])(**flat)
    batch = auto_batch_size(config, DEVICE, tokens_per_sample=176)
    assert 1 <= batch <= 512
