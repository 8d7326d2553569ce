"""unifilter_core.modeling checkpoints: released key names and config layout, save/load round trips, Auto
classes, strict loading rules, device_map."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    SiglipVisionModel,
)

from tests.modeling_helpers import (
    PRESETS,
    VISION,
    load_and_score,
    make_ckpt,
    pad_batch,
    random_pixels,
    sample_rows,
)
from unifilter_core.modeling import (
    UniFilterConfig,
    UniFilterForQualityScoring,
    UniFilterQwen3ForQualityScoring,
    config_class_for,
    load_checkpoint_config,
    load_preset,
)
from unifilter_core.modeling.checkpoint import load_state_strict, map_released_state
from unifilter_core.modeling.modeling_unifilter import MODEL_CLASSES
from unifilter_core.modeling.safetensors_io import load_safetensors_dir


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
    path = make_ckpt(tmp_path, PRESETS[model_type])
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
    raw = json.loads((make_ckpt(tmp_path, PRESETS[model_type]) / "config.json").read_text())
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
    path = make_ckpt(tmp_path, PRESETS[model_type])
    model = UniFilterForQualityScoring.from_pretrained(path)
    expected_cls = (
        UniFilterForQualityScoring if model_type == "llava_qwen" else UniFilterQwen3ForQualityScoring
    )
    assert type(model) is expected_cls and model.config.model_type == model_type
    assert type(AutoConfig.from_pretrained(str(path))) is config_class_for(model_type)
    ids, mask = pad_batch(sample_rows()[:2])
    pixels = random_pixels(3)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        for auto in (AutoModel, AutoModelForSequenceClassification):
            loaded = auto.from_pretrained(str(path))
            assert type(loaded) is expected_cls
            assert torch.equal(loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits, ref)


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
def test_round_trip_gives_identical_logits(tmp_path: Path, model_type: str) -> None:
    first = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path, PRESETS[model_type]))
    first.save_pretrained(tmp_path / "again")
    second = UniFilterForQualityScoring.from_pretrained(tmp_path / "again")
    ids, mask = pad_batch(sample_rows())
    pixels = random_pixels(7)
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
    loaded = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path, seed=3))
    for (name, a), (_, b) in zip(
        list(fresh.named_parameters()) + list(fresh.named_buffers()),
        list(loaded.named_parameters()) + list(loaded.named_buffers()),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert not loaded.training


def test_different_seeds_give_different_weights(tmp_path: Path) -> None:
    a = load_file(make_ckpt(tmp_path, name="a", seed=0) / "model.safetensors")
    b = load_file(make_ckpt(tmp_path, name="b", seed=1) / "model.safetensors")
    c = load_file(make_ckpt(tmp_path, name="c", seed=0) / "model.safetensors")
    assert not torch.equal(a["score.weight"], b["score.weight"])
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_missing_key_raises(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing keys: model\.norm\.weight"):
        UniFilterForQualityScoring.from_pretrained(path)


@pytest.mark.parametrize("extra", ["lm_head.weight", "model.vision_tower.other.weight", "score.bias"])
def test_unexpected_key_raises(tmp_path: Path, extra: str) -> None:
    path = make_ckpt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors[extra] = torch.zeros(2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys"):
        UniFilterForQualityScoring.from_pretrained(path)


def test_shape_mismatch_raises(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["score.weight"] = torch.zeros(3, 32)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ValueError, match="shape mismatches: score.weight"):
        UniFilterForQualityScoring.from_pretrained(path)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle.*not loaded.*safetensors"):
        UniFilterForQualityScoring.from_pretrained(path)


def test_training_args_bin_is_ignored(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path)
    (path / "training_args.bin").write_bytes(b"not a pickle to be read")
    assert load_and_score(path).shape == (1, 1)


def test_missing_path_is_an_error_without_network(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        UniFilterForQualityScoring.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="does not exist"):
        UniFilterForQualityScoring.from_pretrained("weizhiwang/UniFilter-Qwen2.5-1.5B")


def test_trust_remote_code_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trust_remote_code"):
        UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path), trust_remote_code=True)


# ------------------------------------------------------------------------------------------ device_map
def _state_dict_loader_logits(path: Path, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor):
    """Logits of the model built by hand and filled by the strict state-dict loader (no from_pretrained)."""
    config = load_checkpoint_config(path)
    model = MODEL_CLASSES[config.model_type](config).eval()
    state = load_safetensors_dir(path, what="test checkpoint")
    load_state_strict(model, map_released_state(state, config, path, None), source=str(path))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits


@pytest.mark.parametrize("model_type", ["llava_qwen", "llava_qwen3"])
@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, "auto"])
def test_device_map_loads_released_layout_with_the_same_logits(
    tmp_path: Path, model_type: str, device_map
) -> None:
    """transformers' loader (the registered key renames) reads the released layout, tower included."""
    path = make_ckpt(tmp_path, PRESETS[model_type], overrides={"initializer_range": 0.2})
    assert any(k.startswith(VISION) for k in load_file(path / "model.safetensors"))
    ids, mask = pad_batch(sample_rows())
    pixels = random_pixels(7)
    reference = _state_dict_loader_logits(path, ids, mask, pixels)
    for auto in (UniFilterForQualityScoring, AutoModelForSequenceClassification):
        model = auto.from_pretrained(str(path), device_map=device_map)
        assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        assert torch.equal(logits, reference)


def test_device_map_with_tower_from_local_folder(tmp_path: Path) -> None:
    reference = load_and_score(make_ckpt(tmp_path, name="full"))
    path = make_ckpt(tmp_path, vision_tower_dir="siglip", include_vision_weights=False)
    assert torch.equal(load_and_score(path, device_map="cpu"), reference)
    model = UniFilterForQualityScoring.from_pretrained(path, device_map="cpu", torch_dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == torch.float32


def test_plain_transformers_loader_and_saver_know_the_released_layout(tmp_path: Path) -> None:
    """The conversion mapping is registered with transformers: its own (non-overridden) loader reads our files
    and its saver writes the released names back."""
    from transformers import PreTrainedModel

    path = make_ckpt(tmp_path)
    config = load_checkpoint_config(path)
    model, info = PreTrainedModel.from_pretrained.__func__(
        UniFilterForQualityScoring, str(path), config=config, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values())
    assert torch.equal(model.score.weight, UniFilterForQualityScoring.from_pretrained(path).score.weight)
    PreTrainedModel.save_pretrained(model, tmp_path / "native")
    assert set(load_file(tmp_path / "native" / "model.safetensors")) == set(
        load_file(path / "model.safetensors")
    )


def test_output_loading_info_is_honoured(tmp_path: Path) -> None:
    model, info = UniFilterForQualityScoring.from_pretrained(make_ckpt(tmp_path), output_loading_info=True)
    assert isinstance(model, UniFilterForQualityScoring)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize(("env", "drawn"), [("0", False), ("1", True)])
def test_loading_bar_follows_unifilter_progress(
    tiny_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: str,
    drawn: bool,
) -> None:
    """transformers' "Loading weights" bar shows only where the project's bars show (never in logs or CI)."""
    from transformers.utils import logging as hf_logging

    from unifilter_core.modeling import UniFilterForQualityScoring

    monkeypatch.setenv("UNIFILTER_PROGRESS", env)
    before = hf_logging.is_progress_bar_enabled()
    UniFilterForQualityScoring.from_pretrained(tiny_checkpoint)
    assert ("Loading weights" in capsys.readouterr().err) is drawn
    assert hf_logging.is_progress_bar_enabled() == before  # restored
