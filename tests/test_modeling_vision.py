"""unifilter_core.modeling vision tower resolution: weights in the checkpoint, a local SigLIP folder, known names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
)

from tests.modeling_helpers import (
    VISION,
    edit_config,
    load_and_score,
    make_ckpt,
)
from unifilter_core.modeling import (
    KNOWN_VISION_TOWERS,
    UniFilterConfig,
    UniFilterForQualityScoring,
    load_preset,
)
from unifilter_core.modeling import vision_tower as vision_tower_module


@pytest.mark.parametrize("absolute", [False, True])
def test_vision_tower_from_local_directory(tmp_path: Path, absolute: bool) -> None:
    reference = load_and_score(make_ckpt(tmp_path, name="full"))
    tower = tmp_path / "siglip" if absolute else Path("siglip")
    path = make_ckpt(tmp_path, vision_tower_dir=tower, include_vision_weights=False)
    assert not any(k.startswith(VISION) for k in load_file(path / "model.safetensors"))
    edit_config(path, vision_config=None)  # as released: architecture only via mm_vision_tower
    raw = json.loads((path / "config.json").read_text())
    assert raw["mm_vision_tower"] == str(tower)
    assert torch.equal(load_and_score(path), reference)
    config = AutoConfig.from_pretrained(str(path))  # relative towers resolve against the checkpoint folder
    assert config.vision_config.image_size == 32
    assert UniFilterConfig.from_pretrained(path).vision_config.patch_size == 8


def test_released_style_config_with_training_keys_loads_and_round_trips(tmp_path: Path) -> None:
    """A config.json as the original (transformers 4.x) training code writes it: no vision_config, legacy keys."""
    reference = load_and_score(make_ckpt(tmp_path, name="full"))
    tower = "google/siglip-so400m-patch14-384"  # a local folder of that name inside the checkpoint wins
    path = make_ckpt(tmp_path, vision_tower_dir=tower, include_vision_weights=False)
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
    assert torch.equal(load_and_score(path), reference)
    model = UniFilterForQualityScoring.from_pretrained(path)
    assert model.config.num_labels == 1 and model.config.text_config.rope_parameters["rope_theta"] == 10000.0
    model.save_pretrained(tmp_path / "again", include_vision_weights=False)
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["freeze_mm_mlp_adapter"] is False and saved["mm_vision_tower"] == tower


def test_vision_tower_full_siglip_directory_and_override(tmp_path: Path) -> None:
    """A full SiglipModel folder (nested vision_config, text_model.* weights) given by vision_tower=."""
    reference = load_and_score(make_ckpt(tmp_path, name="full"))
    path = make_ckpt(tmp_path, vision_tower_dir="tower", include_vision_weights=False)
    tower = path / "tower"
    vision = json.loads((tower / "config.json").read_text())
    (tower / "config.json").write_text(json.dumps({"model_type": "siglip", "vision_config": vision}))
    weights = load_file(tower / "model.safetensors")
    weights["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)
    weights["logit_scale"] = torch.zeros(1)
    save_file(weights, tower / "model.safetensors")
    moved = tmp_path / "elsewhere"
    tower.rename(moved)
    edit_config(path, vision_config=None, mm_vision_tower="google/siglip-so400m-patch14-384")
    assert torch.equal(load_and_score(path, vision_tower=str(moved)), reference)


def test_vision_tower_keys_without_vision_model_prefix(tmp_path: Path) -> None:
    reference = load_and_score(make_ckpt(tmp_path, name="full"))
    path = make_ckpt(tmp_path, vision_tower_dir="tower", include_vision_weights=False)
    weights = load_file(path / "tower" / "model.safetensors")
    save_file(
        {k.removeprefix("vision_model."): v for k, v in weights.items()}, path / "tower" / "model.safetensors"
    )
    assert torch.equal(load_and_score(path), reference)


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
    reference = load_and_score(make_ckpt(tmp_path, name="full"))
    path = make_ckpt(tmp_path, overrides={"mm_vision_tower": "test-org/tiny-siglip"})
    edit_config(path, vision_config=None)
    assert torch.equal(load_and_score(path), reference)


def test_missing_vision_weights_names_the_option(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path, include_vision_weights=False, overrides={"mm_vision_tower": "google/x"})
    with pytest.raises(ValueError, match="vision_tower="):
        UniFilterForQualityScoring.from_pretrained(path)


def test_unresolvable_tower_name_names_the_option(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path, overrides={"mm_vision_tower": "someone/unknown-tower"})
    edit_config(path, vision_config=None)
    with pytest.raises(ValueError, match="vision_tower="):
        UniFilterForQualityScoring.from_pretrained(path)


def test_tower_directory_without_preprocessor_config_is_rejected(tmp_path: Path) -> None:
    path = make_ckpt(tmp_path, vision_tower_dir="tower", include_vision_weights=False)
    edit_config(path, vision_config=None)
    (path / "tower" / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        UniFilterForQualityScoring.from_pretrained(path)
