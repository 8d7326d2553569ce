"""The embedded world: determinism, level proportions, hidden levels vs texts, file formats, CLI."""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unifilter_core.synth.levels import (
    LevelConfig,
    full_caption,
    make_caption,
    make_document,
    mentions_facts,
    perturb_scene,
    sample_style,
)
from unifilter_core.synth.scenes import (
    COLOURS,
    SHAPES,
    TEXTURES,
    Background,
    Scene,
    SceneObject,
    fact_distance,
    render_scene,
    sample_scene,
)
from unifilter_core.synth.world import (
    PRETRAIN_JSON,
    WorldConfig,
    dealt_levels,
    level_counts,
    write_synthetic_pairs,
    write_world,
)

SMALL = dict(
    train_images=24,
    val_images=8,
    train_documents=16,
    val_documents=8,
    pretrain_images=6,
    caption_tars=2,
    caption_tar_samples=40,
    interleaved_tars=2,
    interleaved_tar_docs=24,
    broken_per_tar=3,
)
_WORDS = re.compile(r"[a-z]+")


def _words(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


def _colours(text: str) -> set[str]:
    return _words(text) & set(COLOURS)


def _shapes(text: str) -> set[str]:
    words = _words(text)
    return {s for s in SHAPES if s in words or s + "s" in words or s + "es" in words}


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world")
    write_world(root, WorldConfig(seed=7, **SMALL))
    return root


def _scenes(n: int, seed: int = 0) -> list[tuple[Scene, random.Random]]:
    rng = random.Random(seed)
    return [(sample_scene(rng), rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_same_bytes_different_seed_different(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_world(again, WorldConfig(seed=7, **SMALL))
    first, second = _tree_bytes(world), _tree_bytes(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other"
    write_world(other, WorldConfig(seed=8, **SMALL))
    third = _tree_bytes(other)
    for name in (
        "sources/datacomp/00000000.tar",
        "sources/obelics/00000001.tar",
        "synthetic/caption/train.json",
    ):
        assert third[name] != first[name], name


def test_validation_split_is_drawn_from_another_seed(world: Path) -> None:
    train = json.loads((world / "synthetic/caption/train.json").read_text())
    val = json.loads((world / "synthetic/caption/val.json").read_text())
    images = world / "synthetic/caption/images"
    assert (images / train[0]["image"]).read_bytes() != (images / val[0]["image"]).read_bytes()
    assert {r["text"] for r in train if r["label"] == 3}.isdisjoint(
        {r["text"] for r in val if r["label"] == 3}
    )


# ------------------------------------------------------------------------------------------------ proportions
def test_level_counts_are_exact_and_dealt_in_blocks() -> None:
    assert level_counts(100, (0.1, 0.2, 0.3, 0.4)) == [10, 20, 30, 40]
    assert sum(level_counts(7, (1, 1, 1, 1))) == 7
    dealt = dealt_levels(12, (0.25,) * 4)
    assert all(sorted(dealt[i : i + 4]) == [0, 1, 2, 3] for i in range(0, 12, 4))


def test_pairs_balanced_by_default_and_configurable(world: Path, tmp_path: Path) -> None:
    for kind, n in (("caption", 24 * 4), ("interleaved", 16)):
        records = json.loads((world / f"synthetic/{kind}/train.json").read_text())
        assert Counter(r["label"] for r in records) == {k: n // 4 for k in range(4)}
    config = WorldConfig(train_images=25, val_images=0, level_weights=(0.1, 0.2, 0.3, 0.4))
    summary = write_synthetic_pairs("caption", tmp_path / "c", config)
    assert summary["train_levels"] == {"0": 10, "1": 20, "2": 30, "3": 40}


def test_tar_levels_cover_all_levels_and_a_few_are_broken(world: Path) -> None:
    truth = pq.read_table(world / "world/truth.parquet").to_pandas()
    for kind, per_tar in (("caption", 40), ("interleaved", 24)):
        part = truth[truth.kind == kind]
        assert len(part) == 2 * per_tar
        broken = part[part.broken.notna()]
        assert len(broken) == 2 * 3 and broken.level.isna().all()
        counts = Counter(part.level.dropna().astype(int))
        assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 6


def test_variant_mix_follows_config() -> None:
    config = LevelConfig()
    counts = Counter(make_caption(s, 1, rng, config).variant for s, rng in _scenes(3000))
    mix = config.level1_mix
    for variant, weight in mix.items():
        assert abs(counts[variant] / 3000 - weight / sum(mix.values())) < 0.04, (variant, counts)


# ------------------------------------------------------------------------------------- hidden levels vs texts
def test_level3_captions_mention_exactly_the_scene() -> None:
    for scene, rng in _scenes(400):
        text = make_caption(scene, 3, rng, LevelConfig()).text
        assert _colours(text) == {o.colour for o in scene.objects}
        assert _shapes(text) == {o.shape for o in scene.objects}
        assert scene.background.tone in _words(text)
        assert (scene.background.texture in _words(text)) or "plain" in _words(text)


def test_level1_style_matched_captions_contradict_two_facts() -> None:
    config = LevelConfig()
    for scene, rng in _scenes(600, seed=1):
        style = sample_style(rng)
        for variant in ("perturbed", "other_scene"):
            text = make_caption(scene, 1, rng, config, style=style, variant=variant)
            assert text.claimed is not None and fact_distance(scene, text.claimed) >= 2
            assert text.text == full_caption(text.claimed, style)  # same wording as a level-3 caption
            assert len(text.claimed.objects) <= 3
            if variant == "perturbed":
                assert len(text.claimed.objects) >= len(scene.objects)  # counts only go up
                # the colour of one object always changes (visible after the tower's pooling)
                assert [o.colour for o in text.claimed.objects[: len(scene.objects)]] != [
                    o.colour for o in scene.objects
                ]


def test_always_perturb_is_configurable_and_checked() -> None:
    scene = Scene((SceneObject("circle", "red", "small", "center"),), Background("white", "plain"))
    for seed in range(50):
        claimed = perturb_scene(
            scene, random.Random(seed), 2, {"shape": 1.0, "colour": 1.0}, 3, ("background",)
        )
        assert claimed.background != scene.background
    with pytest.raises(ValueError, match="always_perturb"):
        LevelConfig(always_perturb=("mood",))


def test_level2_is_accurate_but_loose_and_level0_states_no_fact() -> None:
    config = LevelConfig()
    for scene, rng in _scenes(600, seed=2):
        loose = make_caption(scene, 2, rng, config)
        assert _colours(loose.text) <= {o.colour for o in scene.objects}
        assert _shapes(loose.text) <= {o.shape for o in scene.objects}
        assert not _words(loose.text) & (set(TEXTURES) | {"corner", "center"})
        assert not mentions_facts(make_caption(scene, 0, rng, config).text)


def test_text_alone_does_not_separate_level3_from_style_matched_level1() -> None:
    """A bag-of-words naive Bayes tells level 3 from level 2 but not from style-matched level 1."""
    config = LevelConfig()
    data: dict[int, list[str]] = {3: [], 1: [], 2: []}
    for scene, rng in _scenes(2000, seed=3):
        style = sample_style(rng)
        data[3].append(make_caption(scene, 3, rng, config, style=style).text)
        data[1].append(make_caption(scene, 1, rng, config, style=style, variant="perturbed").text)
        data[2].append(make_caption(scene, 2, rng, config).text)
    assert _naive_bayes_accuracy(data[3], data[2]) > 0.9
    assert _naive_bayes_accuracy(data[3], data[1]) < 0.62


def _naive_bayes_accuracy(a: list[str], b: list[str]) -> float:
    def feats(text: str) -> list[str]:
        words = _WORDS.findall(text.lower())
        return words + [f"{x}_{y}" for x, y in zip(words, words[1:], strict=False)]

    split = len(a) * 3 // 4
    counts = [Counter(f for t in texts[:split] for f in feats(t)) for texts in (a, b)]
    totals = [sum(c.values()) for c in counts]
    vocab = len(set(counts[0]) | set(counts[1]))

    def logp(text: str, k: int) -> float:
        return sum(math.log((counts[k][f] + 1) / (totals[k] + vocab)) for f in feats(text))

    tests = [(t, 0) for t in a[split:]] + [(t, 1) for t in b[split:]]
    return sum((logp(t, 0) < logp(t, 1)) == bool(y) for t, y in tests) / len(tests)


def test_documents_at_each_level() -> None:
    config = LevelConfig()
    rng = random.Random(4)
    for _ in range(150):
        scenes = [sample_scene(rng) for _ in range(rng.randint(1, 3))]
        for level in range(4):
            doc = make_document(scenes, level, rng, config)
            texts = [s for s in doc.slots if s is not None]
            assert sum(s is None for s in doc.slots) == len(scenes) and all(texts)
            truth_colours = {o.colour for s in scenes for o in s.objects}
            if level == 3:
                assert set().union(*map(_colours, texts)) == truth_colours
            if level == 0:
                assert not any(mentions_facts(t) for t in texts)


def test_fact_distance_counts_attributes_objects_and_background() -> None:
    bg = Background("white", "plain")
    a = Scene(
        (SceneObject("circle", "red", "small", "top"), SceneObject("square", "blue", "large", "center")), bg
    )
    b = Scene(
        (SceneObject("square", "blue", "large", "center"), SceneObject("circle", "red", "small", "top")), bg
    )
    assert fact_distance(a, b) == 0  # order does not matter
    c = Scene((SceneObject("circle", "green", "small", "left"),), Background("black", "plain"))
    assert fact_distance(a, c) == 2 + 1 + 1  # colour + position, one missing object, tone


def test_rendering_is_deterministic_and_sized() -> None:
    scene = sample_scene(random.Random(5))
    one = render_scene(scene, random.Random(6), size=64).tobytes()
    assert one == render_scene(scene, random.Random(6), size=64).tobytes()
    assert render_scene(scene, random.Random(6), size=32).size == (32, 32)


# ------------------------------------------------------------------------------------------------ file formats
def test_llava_pretrain_schema(world: Path) -> None:
    folder = world / "pretrain/llava_pretrain"
    records = json.loads((folder / PRETRAIN_JSON).read_text())
    assert len(records) == 6
    for r in records:
        assert set(r) == {"id", "image", "conversations"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and _colours(gpt["value"])
        assert Image.open(folder / "images" / r["image"]).size == (63, 63)  # WorldConfig.image_size


def test_training_json_records(world: Path) -> None:
    for kind in ("caption", "interleaved"):
        folder = world / "synthetic" / kind
        for split in ("train", "val"):
            for r in json.loads((folder / f"{split}.json").read_text()):
                images = [r["image"]] if isinstance(r["image"], str) else r["image"]
                assert r["text"].count("<image>") == len(images) and r["label"] in (0, 1, 2, 3)
                assert all((folder / "images" / p).is_file() for p in images)
                if kind == "caption":
                    assert r["text"].startswith("<image>\n")


def test_tars_read_with_tarfile_and_webdataset(world: Path) -> None:
    wds = pytest.importorskip("webdataset")
    truth = pq.read_table(world / "world/truth.parquet").to_pandas()
    for source in ("datacomp", "obelics"):
        for tar_path in sorted((world / "sources" / source).glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                members = tar.getmembers()
                assert all(m.mtime == members[0].mtime and m.uid == 0 for m in members)
            expected = set(truth[truth.tar == f"sources/{source}/{tar_path.name}"].key)
            keys = {
                s["__key__"] for s in wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False)
            }
            assert keys == expected
            rows = truth[truth.tar == f"sources/{source}/{tar_path.name}"]
            assert set(rows.partition_key) == {f"{source}_{int(tar_path.stem):04d}"}


def test_caption_and_document_members(world: Path) -> None:
    truth = pq.read_table(world / "world/truth.parquet").to_pandas().set_index(["source", "key"])
    with tarfile.open(world / "sources/datacomp/00000000.tar") as tar:
        names = tar.getnames()
        clean = next(
            k for k in sorted({n.split(".")[0] for n in names}) if pd.isna(truth.loc[("datacomp", k)].broken)
        )
        meta = json.loads(tar.extractfile(f"{clean}.json").read())
        assert (
            re.fullmatch(r"[0-9a-f]{32}", meta["uid"])
            and meta["status"] == "success"
            and meta["key"] == clean
        )
        assert tar.extractfile(f"{clean}.txt").read().decode() == meta["caption"]
    separate = 0
    with tarfile.open(world / "sources/obelics/00000000.tar") as tar:
        docs = [n for n in tar.getnames() if n.endswith(".json")]
        assert sum(n.count(".") == 2 for n in tar.getnames()) > 0  # images as separate members <key>.<n>.jpg
        for name in docs:
            key = name.split(".")[0]
            if not pd.isna(truth.loc[("obelics", key)].broken):
                continue
            doc = json.loads(tar.extractfile(name).read())
            for n, (text, info) in enumerate(zip(doc["texts"], doc["image_info"], strict=True)):
                assert (text is None) != (info is None)
                if info is not None and "image_base64" in info:
                    Image.open(io.BytesIO(base64.b64decode(info["image_base64"]))).load()
                elif info is not None:
                    separate += 1
                    Image.open(tar.extractfile(f"{key}.{n}.jpg")).load()
    assert separate > 0


def test_world_tars_read_through_unifilter_readers(world: Path) -> None:
    data = pytest.importorskip("unifilter_core.data")
    from unifilter_core.records import SampleFailure

    truth = pq.read_table(world / "world/truth.parquet").to_pandas().set_index(["source", "key"])
    for source, kind in (("datacomp", "caption"), ("obelics", "interleaved")):
        for tar_path in sorted((world / "sources" / source).glob("*.tar")):
            for key, sample in data.iter_samples(str(tar_path), kind):
                broken = truth.loc[(source, key)].broken
                failed = isinstance(sample, SampleFailure)
                if pd.isna(broken):
                    assert not failed, (key, sample)
                    assert not getattr(sample, "dropped", [])
                elif kind == "caption" or broken == "broken_json":
                    assert failed, (key, broken)
                else:  # a bad image slot is dropped from the document and listed
                    assert failed or sample.dropped, (key, broken)


def test_refuses_foreign_data_and_removes_stale_tars(world: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    (foreign / "sources/datacomp").mkdir(parents=True)
    (foreign / "sources/datacomp/00000000.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="did not write"):
        write_world(foreign, WorldConfig(**SMALL))
    root = tmp_path / "shrink"
    write_world(root, WorldConfig(**SMALL))
    write_world(root, WorldConfig(**{**SMALL, "caption_tars": 1}))
    assert sorted(p.name for p in (root / "sources/datacomp").glob("*.tar")) == ["00000000.tar"]


def test_cli_world(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unifilter_core.cli import main

    flags = ["world", "--root", str(tmp_path), "--seed", "3", "--train-images", "8", "--val-images", "4"]
    flags += [
        "--train-documents",
        "4",
        "--val-documents",
        "4",
        "--pretrain-images",
        "2",
        "--caption-tars",
        "1",
    ]
    flags += ["--caption-tar-samples", "10", "--interleaved-tars", "1", "--interleaved-tar-docs", "6"]
    assert main(flags) == 0
    out = capsys.readouterr().out
    assert "32 train + 16 val" in out and "pairs/s" in out
    assert (tmp_path / "world/world.json").is_file() and (tmp_path / "sources/obelics/00000000.tar").is_file()
    assert main(flags) == 0 and "up to date" in capsys.readouterr().out
    assert main(["world", "--root", str(tmp_path), "--train-images", "-1"]) == 2
