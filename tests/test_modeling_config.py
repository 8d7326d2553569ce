"""unifilter_core.modeling configs: validation, flat/composite round trips, presets, tokenizer facts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import (
    SiglipVisionConfig,
)

from tests.modeling_helpers import (
    make_ckpt,
)
from unifilter_core.modeling import (
    UniFilterConfig,
    UniFilterQwen3Config,
    config_class_for,
    load_preset,
)
from unifilter_core.synth import WorldConfig


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
    path = make_ckpt(tmp_path, tokenizer_dir=tok)
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
