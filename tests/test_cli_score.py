"""``unifilter score``: discovery, --gpu-id block selection, default output folder, resume, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_scoring_engine import caption_members, document_members, write_tar
from unifilter_core.cli import main
from unifilter_core.scoring import discover_tars, select_block


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "datacomp"
    for i in range(3):
        write_tar(folder / f"{i:08d}.tar", caption_members(3, seed=i))
    (folder / "notes.txt").write_text("not a shard")
    (folder / "shard_x.tar").write_bytes(b"")
    return folder


def _score(*args: str) -> int:
    return main(["score", *args, "--num-workers", "0", "--no-progress", "--device", "cpu"])


def test_discover_and_select_block(tmp_path: Path) -> None:
    for name in ("10.tar", "2.tar", "00000001.tar", "abc.tar", "3.tar.gz"):
        (tmp_path / name).write_bytes(b"")
    tars = discover_tars(tmp_path)
    assert [p.name for p in tars] == ["00000001.tar", "2.tar", "10.tar"]
    assert [p.name for p in select_block(tars, 1, 2)] == ["2.tar"]  # ids [2, 4), not positions
    assert select_block(tars, 6, 2) == []
    assert select_block(tars, 0, None) == tars
    assert discover_tars(tmp_path / "2.tar") == [(tmp_path / "2.tar").resolve()]
    with pytest.raises(ValueError, match="needs --tars-per-gpu"):
        select_block(tars, 1, None)


def test_cli_scores_its_block_into_the_data_root(
    shards: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "home"
    common = ["--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards), "--root", str(root)]
    code = _score("caption", *common, "--gpu-id", "1", "--tars-per-gpu", "2", "--batch-size", "2")
    out = capsys.readouterr().out
    assert code == 0
    tables = sorted(p.name for p in (root / "scores" / "datacomp").glob("*.parquet"))
    assert tables == ["00000002.parquet"]  # block 1 of size 2 = the third tar only
    assert "00000002.tar: 3 rows (ok 3, skipped 0, error 0)" in out
    table = pq.read_table(root / "scores" / "datacomp" / "00000002.parquet").to_pylist()
    assert {r["partition_key"] for r in table} == {"datacomp_0002"} and {r["source"] for r in table} == {
        "datacomp"
    }
    assert not list(shards.glob("*.parquet"))  # nothing written into the input folder
    assert _score("caption", *common, "--gpu-id", "1", "--tars-per-gpu", "2") == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_single_tar_and_output_dir(tmp_path: Path, tiny_checkpoint: Path) -> None:
    tar = write_tar(tmp_path / "obelics" / "00000042.tar", document_members(3))
    out = tmp_path / "out"
    code = _score(
        "interleaved",
        "--model-path",
        str(tiny_checkpoint),
        "--tar-file-path",
        str(tar),
        "--output-dir",
        str(out),
    )
    assert code == 0
    rows = pq.read_table(out / "00000042.parquet").to_pylist()
    assert len(rows) == 3 and rows[0]["partition_key"] == "obelics_0042"
    assert (out / "00000042.manifest.json").is_file()


def test_cli_empty_block_exits_zero(shards: Path, tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    args = [
        "--model-path",
        str(tiny_checkpoint),
        "--tar-file-path",
        str(shards),
        "--output-dir",
        str(tmp_path / "o"),
    ]
    assert _score("caption", *args, "--gpu-id", "7", "--tars-per-gpu", "2") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no <number>.tar shards"),
        ("checkpoint", "bad --model-path"),
        ("batch", "--batch-size must be >= 1"),
        ("same_dir", "is the input folder"),
        ("gpu", "--gpu-id must be >= 0"),
    ],
)
def test_cli_errors_are_one_line(
    case: str, message: str, shards: Path, tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    model, tars, extra = str(tiny_checkpoint), str(shards), ["--output-dir", str(tmp_path / "o")]
    if case == "missing":
        tars = str(tmp_path / "nope")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        tars = str(tmp_path / "empty")
    elif case == "checkpoint":
        (tmp_path / "ckpt").mkdir()
        model = str(tmp_path / "ckpt")
    elif case == "batch":
        extra += ["--batch-size", "0"]
    elif case == "same_dir":
        extra = ["--output-dir", str(shards)]
    elif case == "gpu":
        extra += ["--gpu-id", "-1"]
    code = _score("caption", "--model-path", model, "--tar-file-path", tars, *extra)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("unifilter: error: ") and message in err
    assert not (tmp_path / "o").exists()
