"""``unifilter score`` takes the original scripts' command lines: their extra flags mapped or refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tarfixtures import write_caption_tar
from unifilter_core.cli import main
from unifilter_core.cli.score_flags import REFUSED_FLAGS


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("orig") / "medium_vanilla_filter"
    write_caption_tar(folder / "00000000.tar", n=3)
    return folder


def _argv(ckpt: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["score", "caption", "--model-path", str(ckpt), "--tar-file-path", str(shards),
            "--output-dir", str(out), "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def _manifest(out: Path) -> dict:
    return json.loads((out / "00000000.manifest.json").read_text())


@pytest.mark.parametrize("flag", sorted(REFUSED_FLAGS))
def test_refused_original_flags_end_in_one_line(
    flag: str, shards: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    value = ["x"] if flag in ("--model-base", "--conv-mode", "--temperature", "--max-new-tokens") else []
    code = main(_argv(tiny_checkpoint, shards, tmp_path / "out", flag, *value))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"unifilter: error: {flag} is not supported: "), err
    assert not (tmp_path / "out").exists()


def test_workers_is_an_alias_and_max_len_and_aspect_reach_the_scorer(
    shards: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    argv = _argv(tiny_checkpoint, shards, out, "--workers", "0", "--max-len", "300", "--num-gpus", "4")
    assert main([*argv, "--image-aspect-ratio", "resize", "--gpu-id", "0"]) == 0
    manifest = _manifest(out)
    assert manifest["runtime"]["num_workers"] == 0
    assert manifest["config"]["processing"]["max_length"] == 300
    assert manifest["config"]["processing"]["image_aspect_ratio"] == "resize"


def test_square_aspect_on_the_cli_means_stretch(shards: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert (
        main([*_argv(tiny_checkpoint, shards, out, "--workers", "0"), "--image-aspect-ratio", "square"]) == 0
    )
    assert _manifest(out)["config"]["processing"]["image_aspect_ratio"] == "resize"  # LLaVA's name for it


def test_gpu_id_outside_num_gpus_is_refused(
    shards: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_argv(tiny_checkpoint, shards, tmp_path / "o", "--num-gpus", "2", "--gpu-id", "2")) == 2
    assert "outside the fleet of --num-gpus 2" in capsys.readouterr().err


def test_trailing_space_of_the_original_readme_is_tolerated(
    shards: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The original README writes ``--tar-file-path data/datacomp/medium_vanilla_filter\\ `` (a trailing space)."""
    out = tmp_path / "out"
    argv = _argv(tiny_checkpoint, shards, out, "--workers", "0")
    argv[argv.index(str(shards))] = str(shards) + " "
    assert main(argv) == 0
    assert (out / "00000000.parquet").is_file()
