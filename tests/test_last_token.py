"""The scoring forward that runs the last decoder layer on each sequence's last token only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import unifilter_core.modeling.last_token as last_token
from tests.modeling_helpers import pad_batch, random_pixels
from unifilter_core import load_scorer
from unifilter_core.modeling import load_preset
from unifilter_core.modeling.init import build_random_model
from unifilter_core.modeling.last_token import supports_last_token

SENTINEL = -200


def _batch(lens: list[int], image_at: dict[int, list[int]], size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in lens]
    for row, cols in image_at.items():
        for col in cols:
            rows[row][col] = SENTINEL
    ids, mask = pad_batch(rows, pad=7)
    return ids, mask, random_pixels(sum(r.count(SENTINEL) for r in rows), seed=seed, size=size)


def last_token_logits(model, ids, mask, pixels):
    return model(input_ids=ids, attention_mask=mask, pixel_values=pixels, last_token_only=True).logits


@pytest.fixture(scope="module", params=["tiny", "tiny-qwen3", "world"])
def model(request: pytest.FixtureRequest):
    return build_random_model(load_preset(request.param), seed=3).eval()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_equals_the_full_forward(model, attention: str) -> None:
    size = model.config.vision_config.image_size
    # uneven lengths (one of a single token), images at the start, middle and end of rows
    ids, mask, pixels = _batch([40, 1, 23, 9, 40], {0: [0, 17], 2: [22], 3: [4]}, size, seed=1)
    model.model.language_model.config._attn_implementation = attention
    try:
        assert supports_last_token(model)
        with torch.inference_mode():
            want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            got = last_token_logits(model, ids, mask, pixels)
    finally:
        model.model.language_model.config._attn_implementation = "sdpa"
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # rows are independent of their batch: the 1-token row alone gives the same logit
    with torch.inference_mode():
        alone = last_token_logits(model, ids[1:2, :1], mask[1:2, :1], None)
    assert torch.allclose(alone, want[1:2], atol=1e-5)


def test_errors_and_unsupported_models(model) -> None:
    ids, mask, _ = _batch([5, 3], {}, 8)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="right padding"):
            bad = mask.clone()
            bad[0, 0] = 0
            last_token_logits(model, ids, bad, None)
        with pytest.raises(ValueError, match="image sentinels"):
            size = model.config.vision_config.image_size
            last_token_logits(model, ids, mask, torch.randn(1, 3, size, size))
    config = model.model.language_model.config
    model.train()
    config.attention_dropout = 0.1
    assert not supports_last_token(
        model
    )  # its last layer has no dropout: equal to the full forward only at 0
    config.attention_dropout = 0.0
    assert supports_last_token(model)
    model.eval()
    config._attn_implementation = "flex_attention"
    assert not supports_last_token(model)
    config._attn_implementation = "sdpa"
    saved = list(config.layer_types)
    config.layer_types = [*saved[:-1], "sliding_attention"]
    try:
        assert not supports_last_token(model)
    finally:
        config.layer_types = saved
    assert supports_last_token(model)


def test_training_gradients_equal_the_full_forward(model) -> None:
    size = model.config.vision_config.image_size
    ids, mask, pixels = _batch([30, 12, 30, 4], {0: [0], 2: [29], 3: [1]}, size, seed=4)
    labels = torch.tensor([3.0, 1.0, 2.0, 0.0])
    model.train()
    try:
        assert supports_last_token(model)  # no attention dropout in these presets
        grads = []
        for fast in (False, True):
            model.zero_grad()
            out = model(
                input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels, last_token_only=fast
            )
            out.loss.backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        model.zero_grad()
        model.eval()
    full, fast = grads
    assert full.keys() == fast.keys() and len(full) > 10
    for name in full:
        assert torch.allclose(full[name], fast[name], atol=1e-5, rtol=1e-4), name


def test_scorer_uses_it_and_scores_equal_the_full_forward(
    tiny_checkpoint: Path, make_image, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = last_token.last_token_hidden

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(last_token, "last_token_hidden", counting)
    pairs = [(make_image(30 + 5 * i, 40, seed=i), "a small red cube " * (1 + 2 * i)) for i in range(5)]
    docs = [{"texts": ["intro", None, "more words " * 6], "images": [None, make_image(20, 30, 9), None]}]
    scorer = load_scorer(tiny_checkpoint, batch_size=3)
    fast = scorer.score_captions(pairs) + scorer.score_documents(docs)
    assert len(calls) == 3, "the scorer did not take the last-token path"
    prepared = [scorer.prepare_caption(image, text) for image, text in pairs]
    with torch.inference_mode():
        full = scorer.model(**scorer._collate(prepared)).logits[:, 0].tolist()  # the full forward
    assert len(calls) == 3
    for a, b in zip(fast[: len(pairs)], full, strict=True):
        assert a.status == "ok" and a.score == pytest.approx(b, abs=1e-5)
    # a body it cannot run takes the full forward, same scores
    monkeypatch.setattr(last_token, "supports_last_token", lambda model: False)
    again = scorer.score_captions(pairs)
    assert len(calls) == 3 and [r.score for r in again] == pytest.approx(full, abs=1e-5)
