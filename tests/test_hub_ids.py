"""Hub ids (``owner/name``) resolve from the local Hugging Face cache, offline; absent ones name the download."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from unifilter_core import load_scorer
from unifilter_core.hub_cache import looks_like_hub_id, resolve_reference
from unifilter_core.scorer import resolve_checkpoint

SHA = "0123456789abcdef0123456789abcdef01234567"


def _cache_model(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source``'s files out as the hub cache does: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, file in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(file, blob)
        target = snapshot / file.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # any network attempt would fail loudly
    monkeypatch.chdir(tmp_path)  # "owner/name" is not a folder relative to the working directory
    return cache


def test_hub_id_shape() -> None:
    assert looks_like_hub_id("weizhiwang/UniFilter-Qwen2.5-1.5B")
    for not_an_id in ("ckpt", "/abs/ckpt", "a/b/c", "../x", "owner/..", "a /b", ""):
        assert not looks_like_hub_id(not_an_id), not_an_id


def test_checkpoint_hub_id_loads_from_the_cache(hub_cache: Path, tiny_checkpoint: Path, make_image) -> None:
    snapshot = _cache_model(hub_cache, "weizhiwang/UniFilter-Tiny", tiny_checkpoint)
    assert resolve_checkpoint("weizhiwang/UniFilter-Tiny") == snapshot.resolve()
    pairs = [(make_image(30, 20, seed=1), "a red cube")]
    from_hub = load_scorer("weizhiwang/UniFilter-Tiny").score_captions(pairs)
    assert [r.score for r in from_hub] == [
        r.score for r in load_scorer(tiny_checkpoint).score_captions(pairs)
    ]


def test_uncached_hub_id_gives_the_download_command(hub_cache: Path) -> None:
    with pytest.raises(
        ValueError, match=r"nor in the local Hugging Face cache .*run `hf download owner/absent`"
    ):
        load_scorer("owner/absent")
    with pytest.raises(ValueError, match=r"does not exist"):  # a path is still a path
        load_scorer(str(hub_cache / "no" / "such" / "folder"))


def test_vision_tower_hub_id(hub_cache: Path, tmp_path: Path, tiny_tokenizer_dir: Path, make_image) -> None:
    from unifilter_core.modeling import init_checkpoint

    tower = tmp_path / "tower"
    ckpt = init_checkpoint(
        "tiny", tmp_path / "ckpt", tokenizer_dir=tiny_tokenizer_dir, include_vision_weights=False,
        vision_tower_dir=tower,
    )  # fmt: skip
    pairs = [(make_image(30, 20, seed=2), "a dog")]
    expected = [r.score for r in load_scorer(ckpt).score_captions(pairs)]
    _cache_model(hub_cache, "google/tiny-siglip", tower)
    shutil.rmtree(tower)
    with pytest.raises(ValueError, match="vision tower"):
        load_scorer(ckpt)
    scorer = load_scorer(ckpt, vision_tower="google/tiny-siglip")
    assert [r.score for r in scorer.score_captions(pairs)] == expected
    with pytest.raises(ValueError, match=r"hf download google/other-siglip"):
        load_scorer(ckpt, vision_tower="google/other-siglip")


def test_dagster_resource_takes_a_hub_id(hub_cache: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from unifilter_dagster.resources import ScoringModelResource

    snapshot = _cache_model(hub_cache, "weizhiwang/UniFilter-Tiny", tiny_checkpoint)
    resource = ScoringModelResource(checkpoint="weizhiwang/UniFilter-Tiny", device="cpu")
    assert resource.resolve_checkpoint(tmp_path) == snapshot.resolve()
    assert resource.load(tmp_path, resource.settings("caption")).checkpoint == snapshot.resolve()
    with pytest.raises(ValueError, match="hf download weizhiwang/Absent"):
        ScoringModelResource(checkpoint="weizhiwang/Absent").resolve_checkpoint(tmp_path)


def test_resolve_reference_keeps_existing_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert resolve_reference("owner/name", what="checkpoint") == Path("owner/name")


@pytest.mark.parametrize(
    ("scripts", "command"),
    [({"hf", "tiny-agents"}, "hf"), ({"huggingface-cli"}, "huggingface-cli"), (set(), "hf")],
)
def test_download_command_follows_the_installed_cli(
    scripts: set[str], command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib import metadata
    from types import SimpleNamespace

    from unifilter_core import hub_cache

    entry_points = [SimpleNamespace(name=name) for name in scripts]
    monkeypatch.setattr(metadata, "distribution", lambda name: SimpleNamespace(entry_points=entry_points))
    assert hub_cache.download_command("owner/name") == f"{command} download owner/name"


def test_cli_model_path_takes_a_hub_id(
    hub_cache: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_scoring_engine import caption_members, write_tar
    from unifilter_core.cli import main

    _cache_model(hub_cache, "weizhiwang/UniFilter-Tiny", tiny_checkpoint)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000000.tar", caption_members(2))
    common = ["--tar-file-path", str(shards), "--gpu-id", "0", "--batch-size", "2", "--tars-per-gpu", "1",
              "--output-dir", str(tmp_path / "out"), "--num-workers", "0", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert main(["score", "caption", "--model-path", "weizhiwang/UniFilter-Tiny", *common]) == 0
    assert list((tmp_path / "out").glob("*.parquet"))
    assert main(["score", "caption", "--model-path", "weizhiwang/Absent", *common]) == 2
    assert "hf download weizhiwang/Absent" in capsys.readouterr().err
