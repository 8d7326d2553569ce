"""Padding-free packing: packed results equal the padded path (float32 on CPU), plus the scorer hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unifilter_core import load_scorer
from unifilter_core.modeling import load_preset
from unifilter_core.modeling.init import build_random_model
from unifilter_core.modeling.modeling_unifilter import splice_image_features
from unifilter_core.modeling.packing import (
    _chunk_shapes,
    auto_batch_size,
    encode_images_chunked,
    estimate_sample_bytes,
    packed_forward,
    splice_packed,
)
from unifilter_core.scorer import Scorer, ScorerOptions

SENTINEL = -200


def _batch(lens: list[int], image_at: dict[int, list[int]], vocab: int = 590, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lens), max(lens)), 599)
    mask = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for row, n in enumerate(lens):
        ids[row, :n] = torch.randint(0, vocab, (n,), generator=gen)
        for col in image_at.get(row, []):
            ids[row, col] = SENTINEL
        mask[row, :n] = 1
    n_images = int((ids == SENTINEL).sum())
    pixels = torch.randn(n_images, 3, 32, 32, generator=gen)
    return ids, mask, pixels


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3"])
def model(request: pytest.FixtureRequest):
    return build_random_model(load_preset(request.param), seed=0)


def test_splice_packed_equals_padded_splice(model) -> None:
    ids, mask, pixels = _batch([3, 9, 6, 1], {0: [1], 1: [1, 5], 2: [0]})
    embed = model.get_input_embeddings()
    with torch.inference_mode():
        feats = model.encode_images(pixels)
        padded, new_mask = splice_image_features(ids, mask, feats, embed, SENTINEL)
        packed = splice_packed(ids, mask, feats, embed, SENTINEL)
    lengths = new_mask.sum(1)
    assert torch.equal(packed.inputs_embeds[0], padded[new_mask.bool()])
    assert packed.cu_seqlens.tolist() == [0, *torch.cumsum(lengths, 0).tolist()]
    assert packed.cu_seqlens.dtype == torch.int32
    assert packed.max_seqlen == int(lengths.max())
    expected_pos = torch.cat([torch.arange(int(n)) for n in lengths])
    assert torch.equal(packed.position_ids[0], expected_pos)
    assert packed.last_index.tolist() == (torch.cumsum(lengths, 0) - 1).tolist()


@pytest.mark.parametrize("attention", ["varlen", "varlen:block_mask", "sdpa", "eager"])
def test_packed_forward_equals_padded_forward(model, attention: str) -> None:
    ids, mask, pixels = _batch([4, 12, 7, 2, 9], {0: [1], 1: [1, 6], 3: [1], 4: [3]}, seed=1)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = packed_forward(model, ids, mask, pixels, attention=attention, vision_batch_size=2)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # the model's own attention implementation is restored afterwards
    assert model.model.language_model.config._attn_implementation == "sdpa"


def test_packed_forward_text_only_rows_and_errors(model) -> None:
    ids, mask, _ = _batch([5, 3], {})
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = packed_forward(model, ids, mask, None)
        assert torch.allclose(got, want, atol=1e-5)
        with pytest.raises(ValueError, match="image sentinels"):
            packed_forward(model, ids, mask, torch.randn(1, 3, 32, 32))
        with pytest.raises(ValueError, match="packed attention"):
            packed_forward(model, ids, mask, None, attention="bogus")
        bad = mask.clone()
        bad[0, 0] = 0
        with pytest.raises(ValueError, match="right padding"):
            packed_forward(model, ids, bad, None)


def test_encode_images_chunked_equals_one_call(model) -> None:
    pixels = torch.randn(7, 3, 32, 32)
    with torch.inference_mode():
        want = model.encode_images(pixels)
        assert torch.allclose(encode_images_chunked(model, pixels, 3), want, atol=1e-6)
        model._unifilter_vision_compiled = True  # exercise the padded-chunk path without compiling
        try:
            assert torch.allclose(encode_images_chunked(model, pixels, 4), want, atol=1e-6)
        finally:
            del model._unifilter_vision_compiled
    assert _chunk_shapes(7, 4, compiled=True) == [(0, 4), (4, 4)]
    assert _chunk_shapes(13, 8, compiled=True) == [(0, 8), (8, 8)]
    assert _chunk_shapes(10, 8, compiled=True) == [(0, 8), (8, 2)]
    assert _chunk_shapes(10, 8, compiled=False) == [(0, 8), (8, 2)]
    assert _chunk_shapes(11, 8, compiled=True) == [(0, 8), (8, 4)]


def test_scorer_packing_matches_padded(tiny_checkpoint: Path, make_image) -> None:
    pairs = [(make_image(40 + 7 * i, 30 + 3 * i, seed=i), "a red cube " * (1 + 3 * i)) for i in range(6)]
    docs = [
        {
            "texts": ["intro text", None, "more words here " * 4],
            "images": [None, make_image(20, 20, 1), None],
        },
        {"texts": [None, "caption", None], "images": [make_image(30, 40, 2), None, make_image(50, 20, 3)]},
    ]
    padded = load_scorer(tiny_checkpoint, batch_size=4)
    options = ScorerOptions(batch_size=4, packing=True, vision_batch_size=2)
    packed = Scorer(padded.model, padded.processor, options, padded.checkpoint)  # same weights, packed path
    assert packed.uses_packing and not padded.uses_packing
    for a, b in zip(
        padded.score_captions(pairs) + padded.score_documents(docs),
        packed.score_captions(pairs) + packed.score_documents(docs),
        strict=True,
    ):
        assert a.status == b.status and a.score == pytest.approx(b.score, abs=1e-5)
    auto = Scorer(padded.model, padded.processor, ScorerOptions(packing="auto"), padded.checkpoint)
    assert auto.uses_packing is False  # no fast varlen kernel on CPU: the padded path is faster there


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"packing": "yes"}, "packing"),
        ({"packed_attention": "flash"}, "packed_attention"),
        ({"vision_batch_size": 0}, "vision_batch_size"),
        ({"compile_vision": "fast"}, "compile_vision"),
        ({"pin_memory": "on"}, "pin_memory"),
    ],
)
def test_scorer_rejects_bad_performance_options(tiny_checkpoint: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_scorer(tiny_checkpoint, **kwargs)


def test_auto_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    config = build_random_model(load_preset("tiny")).config
    assert auto_batch_size(config, "cpu", tokens_per_sample=176) == 16
    small = estimate_sample_bytes(config, tokens=100, images=1)
    assert estimate_sample_bytes(config, tokens=200, images=1) > small
    assert estimate_sample_bytes(config, tokens=100, images=2) > small
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (small * 100, small * 200))
    got = auto_batch_size(config, "cuda:0", tokens_per_sample=100, memory_fraction=1.0, max_batch=10_000)
    assert got == 96  # 100 samples fit, rounded down to a multiple of 8
    assert auto_batch_size(config, "cuda:0", tokens_per_sample=100, max_batch=32) == 32
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 1))
    assert auto_batch_size(config, "cuda:0", tokens_per_sample=100) == 1
