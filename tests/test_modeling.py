"""Tests of unifilter_core.modeling: config, model math, released checkpoint layout, loading rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from unifilter_core.modeling import (
    IMAGE_TOKEN_INDEX,
    KNOWN_VISION_TOWERS,
    UniFilterConfig,
    UniFilterForQualityScoring,
    UniFilterQwen3Config,
    UniFilterQwen3ForQualityScoring,
    config_class_for,
    init_checkpoint,
    load_preset,
    scores_from_logits,
)
from unifilter_core.modeling import vision_tower as vision_tower_module
from unifilter_core.modeling.modeling_unifilter import class_outputs
from unifilter_core.synth import WorldConfig

VISION = "model.vision_tower.vision_tower.vision_model."
PRESETS = {"llava_qwen": "tiny", "llava_qwen3": "tiny-qwen3"}
IMG = IMAGE_TOKEN_INDEX


# ----------------------------------------------------------------------------------------------- helpers
def _ckpt(tmp_path: Path, preset: str = "tiny", name: str = "ckpt", **kw) -> Path:
    return init_checkpoint(preset, tmp_path / name, seed=kw.pop("seed", 0), **kw)


def _edit_config(path: Path, **changes) -> None:
    raw = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (path / "config.json").write_text(json.dumps(raw))


def _pixels(n: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _rows() -> list[list[int]]:
    """Mixed lengths, 1-3 images per row, sentinels at start/middle/end positions."""
    return [
        [597, IMG, 10, 11, 12, 598],
        [597, IMG, 5, IMG, 7, 8, 9, 10, 11, 12, 13, 598],
        [597, 3, IMG, IMG, 4, IMG, 598],
        [597, IMG, 598],
    ]


def _batch(rows: list[list[int]], pad: int = 599) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def _reference_logits(
    model: UniFilterForQualityScoring, row: list[int], pixels: torch.Tensor
) -> torch.Tensor:
    """One unpadded sample, computed from plain parts: SigLIP hidden_states[-1] -> adaptive pool -> MLP ->
    Qwen body on inputs_embeds -> last position -> linear."""
    tower, mlp = model.model.vision_tower, model.model.mm_projector.mlp_projector
    lm, k = model.model.language_model, model.config.num_image_tokens
    feats = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # (N, P, C)
    n, p, c = feats.shape
    g = int(p**0.5)
    grid = feats.permute(0, 2, 1).reshape(n, c, g, g)
    pooled = F.adaptive_avg_pool2d(grid, int(k**0.5)).reshape(n, c, k).permute(0, 2, 1)
    hidden_in = F.gelu(F.linear(pooled, mlp[0].weight, mlp[0].bias))  # exact (erf) GELU
    images = iter(F.linear(hidden_in, mlp[2].weight, mlp[2].bias))
    pieces = [next(images) if t == IMG else lm.embed_tokens(torch.tensor([t])) for t in row]
    embeds = torch.cat(pieces)[None]  # (1, L, H)
    hidden = lm(inputs_embeds=embeds).last_hidden_state[0, -1]
    return (hidden.float() @ model.score.weight.float().T)[None]


def _per_row_pixels(rows: list[list[int]], pixels: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for row in rows:
        n = row.count(IMG)
        out.append(pixels[start : start + n])
        start += n
    return out


# ----------------------------------------------------------------------------------------- layout & I/O
def _expected_keys(config: UniFilterConfig) -> set[str]:
    text = config.text_config
    keys = {"model.embed_tokens.weight", "model.norm.weight", "score.weight"}
    keys |= {f"model.mm_projector.mlp_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for i in range(text.num_hidden_layers):
        layer = f"model.layers.{i}."
        keys |= {f"{layer}self_attn.{m}_proj.weight" for m in "qkvo"}
        if config.model_type == "llava_qwen":
            keys |= {f"{layer}self_attn.{m}_proj.bias" for m in "qkv"}
        else:
            keys |= {f"{layer}self_attn.{m}_norm.weight" for m in "qk"}
        keys |= {f"{layer}mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
        keys |= {f"{layer}{n}_layernorm.weight" for n in ("input", "post_attention")}
    vision = SiglipVisionModel(config.vision_config).state_dict()
    keys |= {VISION + k for k in vision}
    return keys


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_saved_checkpoint_uses_released_key_names(tmp_path: Path, model_type: str) -> None:
    path = _ckpt(tmp_path, PRESETS[model_type])
    tensors = load_file(path / "model.safetensors")
    config = config_class_for(model_type)(**load_preset(PRESETS[model_type]))
    assert set(tensors) == _expected_keys(config)
    for key in (
        "embeddings.patch_embedding.weight",
        "encoder.layers.1.self_attn.q_proj.weight",
        "post_layernorm.weight",
        "head.probe",
    ):
        assert VISION + key in tensors
    assert not any(k.startswith("lm_head") for k in tensors)
    assert tensors["score.weight"].shape == (1, 32)
    assert tensors["model.mm_projector.mlp_projector.0.weight"].shape == (32, 32)
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (16, 32)  # 2 kv heads x head dim 8


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_saved_config_is_flat_released_layout(tmp_path: Path, model_type: str) -> None:
    raw = json.loads((_ckpt(tmp_path, PRESETS[model_type]) / "config.json").read_text())
    arch = "LlavaQwenClassifier" if model_type == "llava_qwen" else "LlavaQwen3Classifier"
    assert raw["model_type"] == model_type and raw["architectures"] == [arch]
    expected = {
        "mm_hidden_size": 32,
        "mm_projector_type": "aapool_mlp",
        "mm_num_image_tokens": 4,
        "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "flat",
        "use_mm_proj": True,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": 256,
        "num_labels": 1,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "bos_token_id": 597,
        "eos_token_id": 598,
        "pad_token_id": 599,
    }
    assert {k: raw.get(k) for k in expected} == expected
    assert isinstance(raw["mm_vision_tower"], str)
    assert raw["vision_config"]["image_size"] == 32 and raw["vision_config"]["patch_size"] == 8
    assert "text_config" not in raw and "projector_type" not in raw


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_load_via_from_pretrained_and_auto_classes(tmp_path: Path, model_type: str) -> None:
    path = _ckpt(tmp_path, PRESETS[model_type])
    model = UniFilterForQualityScoring.from_pretrained(path)
    expected_cls = (
        UniFilterForQualityScoring if model_type == "llava_qwen" else UniFilterQwen3ForQualityScoring
    )
    assert type(model) is expected_cls and model.config.model_type == model_type
    assert type(AutoConfig.from_pretrained(str(path))) is config_class_for(model_type)
    ids, mask = _batch(_rows()[:2])
    pixels = _pixels(3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for auto in (AutoModel, AutoModelForSequenceClassification):
            loaded = auto.from_pretrained(str(path))
            assert type(loaded) is expected_cls
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_round_trip_gives_identical_logits(tmp_path: Path, model_type: str) -> None:
    first = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path, PRESETS[model_type]))
    first.save_pretrained(tmp_path / "again")
    second = UniFilterForQualityScoring.from_pretrained(tmp_path / "again")
    ids, mask = _batch(_rows())
    pixels = _pixels(7)
    with torch.no_grad():
        a = first(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        b = second(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert torch.equal(a, b)
    assert set(load_file(tmp_path / "again" / "model.safetensors")) == set(
        load_file(tmp_path / "ckpt" / "model.safetensors")
    )


def test_loaded_model_equals_freshly_built_model(tmp_path: Path) -> None:
    """Loading (no init, then strict copy) restores every parameter and buffer of the random-init model."""
    from unifilter_core.modeling.init import build_random_model

    fresh = build_random_model(load_preset("tiny"), seed=3)
    loaded = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path, seed=3))
    for (name, a), (_, b) in zip(
        list(fresh.named_parameters()) + list(fresh.named_buffers()),
        list(loaded.named_parameters()) + list(loaded.named_buffers()),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert not loaded.training


def test_different_seeds_give_different_weights(tmp_path: Path) -> None:
    a = load_file(_ckpt(tmp_path, name="a", seed=0) / "model.safetensors")
    b = load_file(_ckpt(tmp_path, name="b", seed=1) / "model.safetensors")
    c = load_file(_ckpt(tmp_path, name="c", seed=0) / "model.safetensors")
    assert not torch.equal(a["score.weight"], b["score.weight"])
    assert all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------ vision resolution
def _logits(path: Path, **kw) -> torch.Tensor:
    model = UniFilterForQualityScoring.from_pretrained(path, **kw)
    ids, mask = _batch(_rows()[:1])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(1)).logits


@pytest.mark.parametrize("absolute", [False, True])
def test_vision_tower_from_local_directory(tmp_path: Path, absolute: bool) -> None:
    reference = _logits(_ckpt(tmp_path, name="full"))
    tower = tmp_path / "siglip" if absolute else Path("siglip")
    path = _ckpt(tmp_path, vision_tower_dir=tower, include_vision_weights=False)
    assert not any(k.startswith(VISION) for k in load_file(path / "model.safetensors"))
    _edit_config(path, vision_config=None)  # as released: architecture only via mm_vision_tower
    raw = json.loads((path / "config.json").read_text())
    assert raw["mm_vision_tower"] == str(tower)
    assert torch.equal(_logits(path), reference)
    config = AutoConfig.from_pretrained(str(path))  # relative towers resolve against the checkpoint folder
    assert config.vision_config.image_size == 32
    assert UniFilterConfig.from_pretrained(path).vision_config.patch_size == 8


def test_released_style_config_with_training_keys_loads_and_round_trips(tmp_path: Path) -> None:
    """A config.json as the original (transformers 4.x) training code writes it: no vision_config, legacy keys."""
    reference = _logits(_ckpt(tmp_path, name="full"))
    tower = "google/siglip-so400m-patch14-384"  # a local folder of that name inside the checkpoint wins
    path = _ckpt(tmp_path, vision_tower_dir=tower, include_vision_weights=False)
    raw = json.loads((path / "config.json").read_text())
    for key in (
        "vision_config",
        "dtype",
        "rope_parameters",
        "layer_types",
        "id2label",
        "label2id",
        "num_labels",
    ):
        raw.pop(key)
    raw.update(
        {"_name_or_path": "Qwen/Qwen2.5-1.5B-Instruct", "torch_dtype": "bfloat16", "rope_scaling": None,
         "transformers_version": "4.37.2", "freeze_mm_mlp_adapter": False, "mm_projector_lr": None}
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(raw))
    assert torch.equal(_logits(path), reference)
    model = UniFilterForQualityScoring.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.text_config.rope_parameters["rope_theta"] == 10000.0
    model.save_pretrained(tmp_path / "again", include_vision_weights=False)
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["freeze_mm_mlp_adapter"] is False and saved["mm_vision_tower"] == tower


def test_vision_tower_full_siglip_directory_and_override(tmp_path: Path) -> None:
    """A full SiglipModel folder (nested vision_config, text_model.* weights) given by vision_tower=."""
    reference = _logits(_ckpt(tmp_path, name="full"))
    path = _ckpt(tmp_path, vision_tower_dir="tower", include_vision_weights=False)
    tower = path / "tower"
    vision = json.loads((tower / "config.json").read_text())
    (tower / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": vision}))
    weights = load_file(tower / "model.safetensors")
    weights["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)
    weights["logit_scale"] = torch.zeros(1)
    save_file(weights, tower / "model.safetensors")
    moved = tmp_path / "elsewhere"
    tower.rename(moved)
    _edit_config(path, vision_config=None, mm_vision_tower="google/siglip-so400m-patch14-384")
    assert torch.equal(_logits(path, vision_tower=str(moved)), reference)


def test_vision_tower_keys_without_vision_model_prefix(tmp_path: Path) -> None:
    reference = _logits(_ckpt(tmp_path, name="full"))
    path = _ckpt(tmp_path, vision_tower_dir="tower", include_vision_weights=False)
    weights = load_file(path / "tower" / "model.safetensors")
    save_file(
        {k.removeprefix("vision_model."): v for k, v in weights.items()}, path / "tower" / "model.safetensors"
    )
    assert torch.equal(_logits(path), reference)


@pytest.mark.parametrize("name", sorted(KNOWN_VISION_TOWERS))
def test_known_tower_name_resolves_to_builtin_architecture(name: str) -> None:
    flat = load_preset("released-qwen2.5-1.5b")
    flat.pop("vision_config")
    flat["mm_vision_tower"] = name
    vision = UniFilterConfig(**flat).vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1152, 27, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4304, 384, 14)
    assert vision.hidden_act == "gelu_pytorch_tanh" and vision.layer_norm_eps == 1e-6


def test_known_name_uses_weights_from_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_vision = load_preset("tiny")["vision_config"]
    real_load = vision_tower_module.load_preset
    monkeypatch.setitem(KNOWN_VISION_TOWERS, "test-org/tiny-siglip", "tiny-siglip-test")
    monkeypatch.setattr(
        vision_tower_module,
        "load_preset",
        lambda n: dict(tiny_vision) if n == "tiny-siglip-test" else real_load(n),
    )
    reference = _logits(_ckpt(tmp_path, name="full"))
    path = _ckpt(tmp_path, overrides={"mm_vision_tower": "test-org/tiny-siglip"})
    _edit_config(path, vision_config=None)
    assert torch.equal(_logits(path), reference)


def test_missing_vision_weights_names_the_option(tmp_path: Path) -> None:
    path = _ckpt(tmp_path, include_vision_weights=False, overrides={"mm_vision_tower": "google/x"})
    with pytest.raises(ValueError, match="vision_tower="):
        UniFilterForQualityScoring.from_pretrained(path)


def test_unresolvable_tower_name_names_the_option(tmp_path: Path) -> None:
    path = _ckpt(tmp_path, overrides={"mm_vision_tower": "someone/unknown-tower"})
    _edit_config(path, vision_config=None)
    with pytest.raises(ValueError, match="vision_tower="):
        UniFilterForQualityScoring.from_pretrained(path)


def test_tower_directory_without_preprocessor_config_is_rejected(tmp_path: Path) -> None:
    path = _ckpt(tmp_path, vision_tower_dir="tower", include_vision_weights=False)
    _edit_config(path, vision_config=None)
    (path / "tower" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        UniFilterForQualityScoring.from_pretrained(path)


# ------------------------------------------------------------------------------------- strict loading
def test_missing_key_raises(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: model\.norm\.weight"):
        UniFilterForQualityScoring.from_pretrained(path)


@pytest.mark.parametrize("extra", ["lm_head.weight", "model.vision_tower.other.weight", "score.bias"])
def test_unexpected_key_raises(tmp_path: Path, extra: str) -> None:
    path = _ckpt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors[extra] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys"):
        UniFilterForQualityScoring.from_pretrained(path)


def test_shape_mismatch_raises(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["score.weight"] = torch.zeros(3, 32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="shape mismatches: score.weight"):
        UniFilterForQualityScoring.from_pretrained(path)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*not loaded.*safetensors"):
        UniFilterForQualityScoring.from_pretrained(path)


def test_training_args_bin_is_ignored(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    (path / "training_args.bin").write_bytes(b"not a pickle to be read")
    assert _logits(path).shape == (1, 1)


def test_missing_path_is_an_error_without_network(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        UniFilterForQualityScoring.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        UniFilterForQualityScoring.from_pretrained("weizhiwang/UniFilter-Qwen2.5-1.5B")


def test_trust_remote_code_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path), trust_remote_code=True)


# ------------------------------------------------------------------------------------------ model math
@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_batch_matches_independent_reference_and_is_padding_invariant(
    tmp_path: Path, model_type: str
) -> None:
    # a wide init makes every stage (GELU, pooling, splicing) matter at the 1e-5 level
    path = _ckpt(tmp_path, PRESETS[model_type], overrides={"initializer_range": 0.2})
    model = UniFilterForQualityScoring.from_pretrained(path)
    rows = _rows()
    pixels = _pixels(sum(r.count(IMG) for r in rows))
    ids, mask = _batch(rows)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert batch.dtype == torch.float32 and batch.shape == (4, 1)
    per_row = _per_row_pixels(rows, pixels)
    reference = torch.cat([_reference_logits(model, r, p) for r, p in zip(rows, per_row, strict=True)])
    torch.testing.assert_close(batch, reference, atol=1e-5, rtol=0)
    # reversed order, extra padding, different pad id: each sample's score is unchanged
    ids2, mask2 = _batch(rows[::-1] + [[597, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 598]], pad=-1)
    with torch.no_grad():
        again = model(input_ids=ids2, attention_mask=mask2, pixel_values=torch.cat(per_row[::-1])).logits
    torch.testing.assert_close(again[:4].flip(0), batch, atol=1e-5, rtol=0)


def test_splice_layout(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path))
    ids, mask = _batch(_rows())
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(7))
    # each sentinel becomes 4 tokens: lengths 6+3, 12+6, 7+9, 3+3
    assert out.attention_mask.sum(1).tolist() == [9, 18, 16, 6]
    assert out.attention_mask.shape == (4, 18)


def test_encode_images_matches_tower_hidden_states(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path))
    pixels = _pixels(2)
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
        _ckpt(tmp_path, overrides={"mm_vision_select_layer": -2})
    )
    pixels = _pixels(1)
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(model.encode_images(pixels), model.model.mm_projector(hidden))


def test_regression_head_loss_and_scores(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path))
    ids, mask = _batch(_rows())
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(7), labels=labels)
    torch.testing.assert_close(out.loss, ((out.logits[:, 0] - labels) ** 2).mean())
    assert torch.equal(model.scores_from_logits(out.logits), out.logits[:, 0])


def test_classification_head_loss_and_scores(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path, overrides={"num_labels": 4}))
    assert model.score.weight.shape == (4, 32)
    ids, mask = _batch(_rows())
    labels = torch.tensor([0, 1, 2, 3])
    out = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(7), labels=labels)
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
    path = _ckpt(tmp_path)
    ref = _logits(path)
    model = UniFilterForQualityScoring.from_pretrained(path, torch_dtype=torch.bfloat16)
    assert model.score.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids, mask = _batch(_rows()[:1])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(1)).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=0.05, rtol=0.05)


def test_eager_attention_matches_sdpa(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    model = UniFilterForQualityScoring.from_pretrained(path, attn_implementation="eager")
    assert model.config.text_config._attn_implementation == "eager"
    ids, mask = _batch(_rows())
    pixels = _pixels(7)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        sdpa = UniFilterForQualityScoring.from_pretrained(path)(
            input_ids=ids, attention_mask=mask, pixel_values=pixels
        ).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_same_gradients(tmp_path: Path) -> None:
    path = _ckpt(tmp_path)
    ids, mask = _batch(_rows())
    pixels, labels = _pixels(7), torch.tensor([0.0, 1.0, 2.0, 3.0])
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
    model = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path))
    ids, mask = _batch(_rows()[:2])  # 3 sentinels
    with pytest.raises(ValueError, match=r"3 image sentinels.*2 images"):
        model(input_ids=ids, attention_mask=mask, pixel_values=_pixels(2))
    with pytest.raises(ValueError, match=r"3 image sentinels.*0 images"):
        model(input_ids=ids, attention_mask=mask)


def test_left_padding_is_rejected(tmp_path: Path) -> None:
    model = UniFilterForQualityScoring.from_pretrained(_ckpt(tmp_path))
    ids, mask = _batch(_rows()[:2])
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=ids, attention_mask=mask.flip(1), pixel_values=_pixels(3))


# --------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mm_projector_type": "mlp2x_gelu"}, "projector_type"),
        ({"mm_num_image_tokens": 5}, "perfect square"),
        ({"mm_num_image_tokens": 25}, "exceeds the 16 patches"),
        ({"mm_vision_select_layer": 5}, "vision_select_layer"),
        ({"mm_vision_select_feature": "cls_patch"}, "vision_select_feature"),
        ({"image_aspect_ratio": "crop"}, "image_aspect_ratio"),
        ({"tokenizer_model_max_length": 0}, "tokenizer_model_max_length"),
        ({"tokenizer_padding_side": "left"}, "tokenizer_padding_side"),
        ({"num_labels": 0}, "num_labels"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_patch_merge_type": "spatial_unpad"}, "mm_patch_merge_type"),
        ({"mm_hidden_size": 64}, "mm_hidden_size"),
        ({"model_type": "llava_qwen3"}, "model_type"),
    ],
)
def test_bad_config_values_raise(overrides: dict, message: str) -> None:
    flat = {**load_preset("tiny"), **overrides}
    with pytest.raises(ValueError, match=message):
        UniFilterConfig(**flat)


def test_unknown_model_type_and_preset_raise() -> None:
    with pytest.raises(ValueError, match="llava_qwen"):
        config_class_for("llava_llama")
    with pytest.raises(ValueError, match="available presets"):
        load_preset("nope")


def test_composite_config_round_trips_through_flat_dict() -> None:
    config = UniFilterQwen3Config(
        vision_config=SiglipVisionConfig(hidden_size=16, num_attention_heads=2, image_size=28, patch_size=7),
        text_config={"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
        num_image_tokens=4,
        num_labels=3,
        image_aspect_ratio="resize",
    )
    again = UniFilterQwen3Config(**json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()
    assert again.num_labels == 3 and again.image_aspect_ratio == "resize"
    assert again.text_config.head_dim == 8 and again.vision_config.patch_size == 7


@pytest.mark.parametrize(
    "name", ["tiny", "tiny-qwen3", "world", "released-qwen2.5-1.5b", "released-qwen3-0.6b"]
)
def test_presets_build_valid_configs(name: str) -> None:
    flat = load_preset(name)
    config = config_class_for(flat["model_type"])(**flat)
    assert config.num_image_tokens <= config.num_patches
    assert config.vision_config.hidden_size == flat["mm_hidden_size"]


def test_world_preset_shapes() -> None:
    config = UniFilterConfig(**load_preset("world"))
    # one 21 px patch, and one image vector, per cell of the world's 3 x 3 grid (63 px images)
    assert (config.vision_config.image_size, config.num_patches, config.num_image_tokens) == (63, 9, 9)
    assert WorldConfig().image_size == config.vision_config.image_size
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers) == (128, 3)
    assert config.tokenizer_model_max_length == 512


def test_tokenizer_dir_sets_vocab_and_special_ids(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    vocab = {f"t{i}": i for i in range(40)}
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    added = {"<|endoftext|>": 40, "<|im_start|>": 41, "<|im_end|>": 42, "[PAD]": 43}
    (tok / "added_tokens.json").write_text(json.dumps(added))
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "[PAD]"}
    (tok / "special_tokens_map.json").write_text(json.dumps(specials))
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    path = _ckpt(tmp_path, tokenizer_dir=tok)
    raw = json.loads((path / "config.json").read_text())
    assert (raw["vocab_size"], raw["bos_token_id"], raw["eos_token_id"], raw["pad_token_id"]) == (
        44,
        40,
        42,
        43,
    )
    assert load_file(path / "model.safetensors")["model.embed_tokens.weight"].shape == (44, 32)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "special_tokens_map.json"):
        assert (path / name).read_text() == (tok / name).read_text()
