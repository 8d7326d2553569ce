"""unifilter_core.modeling model math: splicing, pooling, heads and losses, dtypes and attention backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.modeling_helpers import (
    IMG,
    PRESETS,
    load_and_score,
    make_ckpt,
    pad_batch,
    per_row_pixels,
    random_pixels,
    reference_logits,
    sample_rows,
)
from unifilter_core.modeling import (
    UniFilterForQualityScoring,
    scores_from_logits,
)
from unifilter_core.modeling.modeling_unifilter import class_outputs


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_batch_matches_independent_reference_and_is_padding_invariant(
    tmp_path: Path, model_type: str
) -> None:
    # a wide init makes every stage (GELU, pooling, splicing) matter at the 1e-5 level
    path = make_ckpt(tmp_path, PRESETS[model_type], overrides={"initializer_range": 0.2})
    model = UniFilterForQualityScoring.from_pretrained(path)
    rows = sample_rows()
    pixels = random_pixels(sum(r.count(IMG) for r in rows))
    ids, mask = pad_batch(rows)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert batch.dtype == torch.float32 and batch.shape == (4, 1)
    per_row = per_row_pixels(rows, pixels)
    reference = torch.cat([reference_logits(model, r, p) for r, p in zip(rows, per_row, strict=True)])
    torch.testing.assert_close(batch, reference, atol=1e-5, rtol=0)
    # reversed order, extra padding, different pad id: each sample's score is unchanged
    ids2, mask2 = pad_batch(
        rows[::-1] + [[597, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 598]], pad=-1
    )
    with torch.no_grad():
        again = model(input_ids=ids2, attention_mask=mask2, pixel_values=torch.cat(per_row[::-1])).logits
    torch.testing.assert_close(again[:4].flip(0), batch, atol=1e-5, rtol=0)


def test_splice_layout(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path))
    ids, mask = pad_batch(sample_rows())
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(7))
    # each sentinel becomes 4 tokens: lengths 6+3, 12+6, 7+9, 3+3
    assert out.attention_mask.sum(1).tolist() == [9, 18, 16, 6]
    assert out.attention_mask.shape == (4, 18)


def test_encode_images_matches_tower_hidden_states(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path))
    pixels = random_pixels(2)
    with torch.no_grad():
        features = model.encode_images(pixels)
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        expected = model.model.mm_projector(hidden)
    assert features.shape == (2, 4, 32)
    torch.testing.assert_close(features, expected)


def test_aapool_is_true_adaptive_pooling() -> None:
    """27x27 -> 12x12 uses uneven overlapping windows, pooled row-major."""
    from unifilter_core.modeling.modeling_unifilter import AAPoolProjector

    proj = AAPoolProjector(1, 1, 144)
    proj.mlp_projector = torch.nn.Identity()
    grid = torch.arange(729, dtype=torch.float32).reshape(1, 729, 1)  # value = row * 27 + col
    out = proj(grid)[0, :, 0]
    assert out.shape == (144,)
    # window 0 covers rows/cols [0, 3) -> mean = 28; window (0, 1) covers cols [2, 5) -> mean 28 + 2
    assert out[0].item() == pytest.approx(28.0) and out[1].item() == pytest.approx(30.0)
    assert out[12].item() == pytest.approx(28.0 + 2 * 27)


def test_projector_uses_exact_gelu() -> None:
    from unifilter_core.modeling.modeling_unifilter import AAPoolProjector

    proj = AAPoolProjector(8, 6, 4)
    features = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0)) * 3
    first, second = proj.mlp_projector[0], proj.mlp_projector[2]
    pooled = F.adaptive_avg_pool2d(features.transpose(1, 2).reshape(2, 8, 4, 4), 2).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(proj(features), second(F.gelu(first(pooled))))
        assert not torch.allclose(
            proj(features), second(F.gelu(first(pooled), approximate="tanh")), atol=1e-6
        )


def test_vision_select_layer_other_than_last(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(
        make_ckpt(tmp_path, overrides={"mm_vision_select_layer": -2})
    )
    pixels = random_pixels(1)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.encode_images(pixels), model.model.mm_projector(hidden))


def test_regression_head_loss_and_scores(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path))
    ids, mask = pad_batch(sample_rows())
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(7), labels=labels)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - labels) ** 2).mean())
    assert torch.equal(model.scores_from_logits(out.logits), out.logits[:, 0])


def test_classification_head_loss_and_scores(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path, overrides={"num_labels": 4}))
    assert model.score.weight.shape == (4, 32)
    ids, mask = pad_batch(sample_rows())
    labels = torch.tensor([0, 1, 2, 3])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(7), labels=labels)
    assert out.logits.shape == (4, 4)
    log_probs = out.logits.log_softmax(-1)
    torch.testing.assert_close(out.loss, -log_probs[torch.arange(4), labels].mean())
    probs = out.logits.softmax(-1)
    torch.testing.assert_close(model.scores_from_logits(out.logits), probs[:, 1])  # the original's score
    score, quality_class, level = class_outputs(out.logits)
    torch.testing.assert_close(score, probs[:, 1])
    assert torch.equal(quality_class, probs.argmax(-1))
    torch.testing.assert_close(level, (probs * torch.arange(4.0)).sum(-1))
    with pytest.raises(ValueError, match=">= 2 labels"):
        class_outputs(out.logits[:, :1])
    out.loss.backward()
    assert (
        model.score.weight.grad is not None
        and model.model.mm_projector.mlp_projector[0].weight.grad is not None
    )


def test_two_class_score_is_probability_of_class_one() -> None:
    logits = torch.tensor([[0.3, 1.2], [2.0, -1.0]])
    torch.testing.assert_close(scores_from_logits(logits), logits.softmax(-1)[:, 1])


def test_bfloat16_load_keeps_head_in_float32(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    ref = load_and_score(path)
    model = UniFilterForQualityScoring.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert model.score.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids, mask = pad_batch(sample_rows()[:1])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(1)).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=0.05, rtol=0.05)


def test_eager_attention_matches_sdpa(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    model = UniFilterForQualityScoring.from_pretrained(path, attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "eager"
    ids, mask = pad_batch(sample_rows())
    pixels = random_pixels(7)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        sdpa = UniFilterForQualityScoring.from_pretrained(path)(
            input_ids=ids, attention_mask=mask, pixel_values=pixels
        ).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    ids, mask = pad_batch(sample_rows())
    pixels, labels = random_pixels(7), torch.tensor([0.0, 1.0, 2.0, 3.0])
    grads = []
    for checkpointing in (False, True):
        model = UniFilterForQualityScoring.from_pretrained(path).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.language_model.gradient_checkpointing
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=labels).loss.backward()
        grads.append(model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_sentinel_image_count_mismatch_says_the_counts(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path))
    ids, mask = pad_batch(sample_rows()[:2])  # 3 sentinels
    with pytest.raises(ValueError, match=r"3 image sentinels.*2 images"):
        model(input_ids=ids, attention_mask=mask, pixel_values=random_pixels(2))
    with pytest.raises(ValueError, match=r"3 image sentinels.*0 images"):
        model(input_ids=ids, attention_mask=mask)


def test_left_padding_is_rejected(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path))
    ids, mask = pad_batch(sample_rows()[:2])
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=ids, attention_mask=mask.flip(1), pixel_values=random_pixels(3))
