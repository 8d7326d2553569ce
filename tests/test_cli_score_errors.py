"""``unifilter score``: id blocks, one score folder per input folder, output checks before the model loads,
failed tars at the end of a block, and one `unifilter: error:` line for every fixable failure."""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import unifilter_core.scorer as scorer_module
import unifilter_core.scoring as scoring
from tests.test_scoring_engine import caption_members, write_tar
from unifilter_core.cli import main
from unifilter_core.partition_groups import PartitionTars, score_partition_tars
from unifilter_core.partition_steps import TarSource
from unifilter_core.scoring import output
from unifilter_core.scoring.source_marker import SourceMismatchError, write_source_marker


def _score(*args: str) -> int:
    return main(["score", *args, "--num-workers", "0", "--no-progress", "--device", "cpu"])


def _shards(folder: Path, ids: list[int]) -> Path:
    for i in ids:
        write_tar(folder / f"{i:08d}.tar", caption_members(2, seed=i))
    return folder


def _one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("unifilter: error: "), err
    return err


def test_block_scores_ids_and_lists_missing_ones(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    shards = _shards(tmp_path / "datacomp", [0, 2, 5])
    out = tmp_path / "out"
    common = ["--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards), "--output-dir", str(out)]
    assert _score("caption", *common, "--gpu-id", "1", "--tars-per-gpu", "2") == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000002.parquet"]
    assert "ids 2-3): tar ids 2; missing ids 3" in capsys.readouterr().out
    assert _score("caption", *common, "--gpu-id", "3", "--tars-per-gpu", "2") == 0
    assert "block 3 (tars-per-gpu 2, ids 6-7) has none of the 3 tar(s)" in capsys.readouterr().err


def test_default_block_is_128_tar_ids(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    shards = _shards(tmp_path / "datacomp", [0, 128])
    out = tmp_path / "out"
    assert _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-dir", str(out)) == 0  # fmt: skip
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000000.parquet"]
    assert "missing ids 1-127" in capsys.readouterr().out


def test_two_inputs_of_one_name_never_share_a_score_folder(
    tiny_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    root = tmp_path / "home"
    a = _shards(tmp_path / "pool_a" / "shards", [0])
    b = _shards(tmp_path / "pool_b" / "shards", [0])
    common = ["--model-path", str(tiny_checkpoint), "--root", str(root)]
    assert _score("caption", *common, "--tar-file-path", str(a)) == 0
    table = root / "scores" / "shards" / "00000000.parquet"
    marker = json.loads((root / "scores" / "shards" / ".source.json").read_text())
    assert marker == {"source": "shards", "input": str(a.resolve())}
    before = table.stat().st_mtime_ns
    capsys.readouterr()
    assert _score("caption", *common, "--tar-file-path", str(b), "--force") == 2
    err = _one_error_line(capsys.readouterr().err)
    assert str(a.resolve()) in err and "--source NAME" in err and "--output-dir DIR" in err
    assert table.stat().st_mtime_ns == before
    assert _score("caption", *common, "--tar-file-path", str(b), "--output-dir", str(table.parent)) == 2
    assert _score("caption", *common, "--tar-file-path", str(b), "--source", "pool_b") == 0
    assert (root / "scores" / "pool_b" / "00000000.parquet").is_file()


def test_score_partition_refuses_a_moved_source_path(tmp_path: Path) -> None:
    old, new = _shards(tmp_path / "old", [0]), _shards(tmp_path / "new", [0])
    write_source_marker(tmp_path / "scores" / "src", "src", old)
    part = PartitionTars(
        TarSource("src", "caption", str(new)), "src_0000", [("src_0000", new / "00000000.tar")]
    )
    loads: list[int] = []
    with pytest.raises(SourceMismatchError, match="holds tables of input"):
        score_partition_tars(tmp_path, part, request_keys={"src_0000": "k"}, load=lambda: loads.append(1))
    assert not loads
    assert not list((tmp_path / "scores" / "src").glob("*.parquet"))


def test_unwritable_output_is_refused_before_the_model_loads(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    shards = _shards(tmp_path / "datacomp", [0])
    loaded: list[str] = []
    monkeypatch.setattr(scorer_module, "load_scorer", lambda *a, **k: loaded.append("model"))

    def read_only(folder: Path) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(output, "check_output_writable", read_only)
    code = _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-dir", str(tmp_path / "ro"))  # fmt: skip
    assert code == 2 and loaded == []
    assert "Read-only file system" in _one_error_line(capsys.readouterr().err)


@dataclass
class _Summary:
    tar_path: Path
    rows: int = 2
    wall_s: float = 0.1
    error: str | None = None

    def describe(self) -> str:
        return f"{self.tar_path.name}: {'failed' if self.error else 'ok'}"


def _fake_engine(monkeypatch, outcomes: dict[str, str | BaseException | None]) -> None:
    monkeypatch.setattr(scorer_module, "load_scorer", lambda *a, **k: object())

    def score_tars(tars, *a, **k):
        for tar in tars:
            outcome = outcomes[tar.name]
            if isinstance(outcome, BaseException):
                raise outcome
            yield _Summary(tar, error=outcome)

    monkeypatch.setattr(scoring, "score_tars", score_tars)


def test_failed_tars_are_listed_and_exit_one(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    shards = _shards(tmp_path / "datacomp", [0, 1, 2])
    _fake_engine(monkeypatch, {"00000000.tar": None, "00000001.tar": "truncated tar", "00000002.tar": None})
    code = _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-dir", str(tmp_path / "o"))  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "00000002.tar: ok" in captured.out  # the tar after the failed one was still scored
    assert "1 of 3 tar(s) failed:\n  00000001.tar: truncated tar" in captured.err


def test_disk_full_during_the_run_is_one_line(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    shards = _shards(tmp_path / "datacomp", [0])
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o" / "00000000.parquet"))
    _fake_engine(monkeypatch, {"00000000.tar": full})
    code = _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-dir", str(tmp_path / "o"))  # fmt: skip
    err = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "00000000.parquet: No space left on device; free disk space" in err


def test_check_output_writable_probes_the_folder(tmp_path: Path) -> None:
    assert output.check_output_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # folders made for the probe are removed again
    (tmp_path / "c").mkdir()
    output.check_output_writable(tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []  # the probe is removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot write in"):
        output.check_output_writable(tmp_path / "file" / "sub")


def _broken_checkpoint(tiny: Path, tmp_path: Path, case: str) -> Path:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    weights = ckpt / "model.safetensors"
    if case == "config_list":
        (ckpt / "config.json").write_text("[]")
    elif case == "config_garbage":
        (ckpt / "config.json").write_text("{not json")
    elif case == "empty_weights":
        weights.write_bytes(b"")
    elif case == "garbage_weights":
        weights.write_bytes(b"\xff" * 64)
    elif case == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return ckpt


@pytest.mark.parametrize(
    "case", ["config_list", "config_garbage", "empty_weights", "garbage_weights", "truncated_weights"]
)
def test_bad_checkpoints_end_in_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys, case: str) -> None:
    shards = _shards(tmp_path / "datacomp", [0])
    ckpt = _broken_checkpoint(tiny_checkpoint, tmp_path, case)
    code = _score("caption", "--model-path", str(ckpt), "--tar-file-path", str(shards),
                  "--output-dir", str(tmp_path / "o"))  # fmt: skip
    err = _one_error_line(capsys.readouterr().err)
    assert code == 2 and "Traceback" not in err
    named = "config.json" if case.startswith("config") else str(ckpt)
    assert named in err


def test_bad_checkpoint_traceback_is_kept_for_debug_logging(
    tiny_checkpoint: Path, tmp_path: Path, caplog, capsys
) -> None:
    shards = _shards(tmp_path / "datacomp", [0])
    ckpt = _broken_checkpoint(tiny_checkpoint, tmp_path, "empty_weights")
    with caplog.at_level("DEBUG", logger="unifilter_core.cli.score"):
        code = _score("caption", "--model-path", str(ckpt), "--tar-file-path", str(shards),
                      "--output-dir", str(tmp_path / "o"))  # fmt: skip
    assert code == 2
    assert [r.getMessage() for r in caplog.records if r.exc_info] == ["checkpoint load failed"]
    _one_error_line(capsys.readouterr().err)
