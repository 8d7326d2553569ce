"""The world tower's vision pre-training (unifilter_core.training.vision) and its place in prepare_world_init."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from unifilter_core.modeling import UniFilterForQualityScoring, init_checkpoint
from unifilter_core.processing import ProcessingConfig, UniFilterProcessor
from unifilter_core.synth import WorldConfig
from unifilter_core.synth.scenes import POSITIONS, Background, Scene, SceneObject, sample_scene
from unifilter_core.tokenization import load_tokenizer
from unifilter_core.training.vision import (
    IGNORE,
    SceneHeads,
    VisionPretrainConfig,
    pretrain_world_tower,
    scene_accuracy,
    scene_targets,
    world_scene_batch,
)
from unifilter_core.training.world import prepare_world_init

TOWER = "model.vision_tower."
SMALL_WORLD = WorldConfig(train_images=8, val_images=4, train_documents=4, val_documents=4, pretrain_images=8,
                          caption_tars=0, interleaved_tars=0)  # fmt: skip


@pytest.fixture(scope="module")
def world_init(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A random-init checkpoint of the world preset (63 px, 3 x 3 patches of 21 px)."""
    out = tmp_path_factory.mktemp("world_init")
    return Path(init_checkpoint("world", out / "init", tokenizer_dir=tiny_tokenizer_dir, seed=0))


def _load(path: Path) -> tuple[UniFilterForQualityScoring, UniFilterProcessor]:
    model = UniFilterForQualityScoring.from_pretrained(path)
    processor = UniFilterProcessor(load_tokenizer(path), ProcessingConfig.from_model_config(model.config))
    return model, processor


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_scene_targets_follow_the_grid() -> None:
    scene = Scene(
        (
            SceneObject("cross", "blue", "large", "top left"),
            SceneObject("circle", "red", "small", "bottom right"),
        ),
        Background("black", "dotted"),
    )
    t = scene_targets([scene])
    assert t["occupant"][0].tolist() == [5, 0, 0, 0, 0, 0, 0, 0, 1]  # 1 + SHAPES.index: circle 1, cross 5
    assert t["colour"][0].tolist() == [4] + [IGNORE] * 7 + [0]  # blue, red (COLOURS order)
    assert t["size"][0].tolist() == [1] + [IGNORE] * 7 + [0]
    assert (t["tone"].item(), t["texture"].item()) == (2, 3)
    assert len(POSITIONS) == 9


def test_world_scene_batch_is_deterministic(world_init: Path) -> None:
    _, processor = _load(world_init)
    a = world_scene_batch(SMALL_WORLD, 5, "vision-test", processor)
    b = world_scene_batch(SMALL_WORLD, 5, "vision-test", processor)
    assert a.pixels.shape == (5, 3, 63, 63)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.occupant, b.occupant)
    other = world_scene_batch(SMALL_WORLD, 5, "vision-other", processor)
    assert not torch.equal(a.pixels, other.pixels)


def test_pretraining_teaches_the_tower_objects_and_changes_nothing_else(world_init: Path) -> None:
    model, processor = _load(world_init)
    before = _state(model)
    held_out = world_scene_batch(SMALL_WORLD, 200, "vision-probe", processor)
    torch.manual_seed(0)
    untrained = scene_accuracy(model, SceneHeads(64), held_out)
    config = VisionPretrainConfig(images=2000, eval_images=200, epochs=8, seed=3)
    result = pretrain_world_tower(model, processor, SMALL_WORLD, config)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(TOWER) for k in changed)
    # the head-free parts of the tower (post_layernorm, pooling head) are never used by the model and stay put
    assert not any(".post_layernorm." in k or ".head." in k for k in changed)
    acc = result["held_out_accuracy"]
    # chance: shape 0.2, colour 0.125, cell 0.11, tone 0.33
    assert acc["colour"] > 0.9 and acc["tone"] > 0.95 and acc["cell"] > 0.5 and acc["shape"] > 0.3, acc
    assert untrained["shape"] < 0.3 and untrained["colour"] < 0.4, untrained
    assert result["config"]["images"] == 2000 and len(result["history"]) == 8
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())  # flags restored


def test_pretraining_is_reproducible(world_init: Path) -> None:
    config = VisionPretrainConfig(images=128, eval_images=32, epochs=1, batch_size=32, seed=1)
    towers = []
    for _ in range(2):
        model, processor = _load(world_init)
        torch.manual_seed(random.randrange(1000))  # global state must not matter
        pretrain_world_tower(model, processor, SMALL_WORLD, config)
        towers.append(model.model.vision_tower.state_dict())
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])


def test_bad_vision_config_is_refused() -> None:
    with pytest.raises(ValueError, match="epochs"):
        VisionPretrainConfig(epochs=0)
    with pytest.raises(ValueError, match="learning_rate"):
        VisionPretrainConfig(learning_rate=0)


def test_prepare_world_init_pretrains_the_tower(tmp_path: Path) -> None:
    from unifilter_core.synth import write_world

    write_world(tmp_path, SMALL_WORLD)
    plain = prepare_world_init(tmp_path, vision=False)
    random_tower = _state(UniFilterForQualityScoring.from_pretrained(plain))
    assert not (plain / "vision_pretrain.json").exists()
    init = prepare_world_init(tmp_path, vision=VisionPretrainConfig(images=64, eval_images=16, epochs=1))
    report = json.loads((init / "vision_pretrain.json").read_text())
    assert report["config"]["images"] == 64 and set(report["held_out_accuracy"]) >= {"colour", "occupant"}
    trained = UniFilterForQualityScoring.from_pretrained(init).state_dict()
    differs = {k for k in trained if not torch.equal(trained[k], random_tower[k])}
    assert differs and all(k.startswith(TOWER) for k in differs)
    assert (init / "tokenizer_config.json").is_file()  # saving the model kept the tokenizer files


def test_default_size_follows_the_world() -> None:
    scenes = [sample_scene(random.Random(i)) for i in range(3)]
    assert scene_targets(scenes)["occupant"].shape == (3, 9)
    assert VisionPretrainConfig().images is None  # None: the world's pretrain_images, at least MIN_IMAGES


def test_world_stage2_config_merges_pairs_safely_under_concurrency(tmp_path: Path) -> None:
    """Two trainings on one data root merge the pairs at once: both get a complete, identical merged file."""
    from concurrent.futures import ThreadPoolExecutor

    from unifilter_core.synth import write_world
    from unifilter_core.training.world import merge_pairs, world_stage2_config

    write_world(tmp_path, SMALL_WORLD)
    out = tmp_path / "models" / "stage2_data" / "train.json"
    with ThreadPoolExecutor(8) as pool:
        paths = list(
            pool.map(lambda _: merge_pairs(tmp_path, "train", ("caption", "interleaved"), out), range(32))
        )
    assert set(paths) == {out}
    merged = json.loads(out.read_text())
    kinds = {r["kind"] for r in merged}
    assert kinds == {"caption", "interleaved"} and all(Path(r["image"] if isinstance(r["image"], str)
                                                        else r["image"][0]).is_absolute() for r in merged)  # fmt: skip
    assert not list(out.parent.glob(".*.tmp"))  # no temporary left behind
    config = world_stage2_config(tmp_path)
    assert config.data_path == str(out) and Path(config.eval_data_path).is_file()
