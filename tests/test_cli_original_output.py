"""``--output-format original`` and the original README's scoring commands, run verbatim.

The original scripts write ``<NNNNNNNN>_quality_score.parquet`` into the tar folder: caption rows are the sample
json's fields plus ``quality_score``, interleaved rows ``key`` plus ``quality_score``. Here the same files come
from the streaming engine, with a row for every sample (our ``key``/``status``/``reason`` beside them), a manifest
beside each table, and resume as for our own tables.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.tarfixtures import (
    caption_members,
    corrupt_jpeg,
    jpeg_bytes,
    write_caption_tar,
    write_interleaved_tar,
    write_tar,
)
from tests.test_hub_ids import _cache_model
from unifilter_core.cli import main

REPO = Path(__file__).resolve().parents[1]


def _datacomp_shards(folder: Path) -> Path:
    """img2dataset layout: 9-digit keys, jpg/txt/json members, a parquet and a stats json per shard."""
    members = []
    for i in range(4):
        members += caption_members(f"{i:09d}", image=jpeg_bytes(color=(40 * i, 90, 160)), text=f"a photo {i}")
    members += caption_members("000000004", image=corrupt_jpeg(), text="broken image")
    write_tar(folder / "00000000.tar", members)
    write_caption_tar(folder / "00000001.tar", n=3, start=10)
    for stem in ("00000000", "00000001"):  # img2dataset's own companions: never taken for stray files
        (folder / f"{stem}.parquet").write_bytes(b"PAR1")
        (folder / f"{stem}_stats.json").write_text("{}")
    return folder


def _score(*argv: str) -> int:
    return main(["score", *argv, "--device", "cpu", "--num-workers", "0", "--no-progress"])


def test_caption_tables_next_to_the_tars_with_json_fields(
    tmp_path: Path,
    tiny_checkpoint: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shards = _datacomp_shards(tmp_path / "shards")
    root = tmp_path / "home"
    with caplog.at_level(logging.WARNING):
        code = _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                      "--output-format", "original", "--root", str(root))  # fmt: skip
    assert code == 0
    assert "not shards" not in caplog.text  # the img2dataset companions are expected there
    table = shards / "00000000_quality_score.parquet"
    df = pd.read_parquet(table)
    assert df["uid"].tolist() == [f"uid{i:09d}" for i in range(5)]
    assert {"url", "caption", "json_status", "width", "height", "key", "status", "reason", "flags"} <= set(
        df.columns
    )
    assert "quality_class" not in df.columns  # a regression head, as the original
    assert df["status"].tolist()[:4] == ["ok"] * 4 and df["reason"].iloc[4] == "image_decode_error"
    assert df["quality_score"].iloc[:4].notna().all() and pd.isna(df["quality_score"].iloc[4])
    assert df["json_status"].iloc[0] == "success"  # img2dataset's own status field, kept
    manifest = json.loads((shards / "00000000_quality_score.manifest.json").read_text())
    assert manifest["table"] == {**manifest["table"], "path": table.name, "format": "original", "rows": 5}
    assert manifest["listing"]["missing_keys"] == 0
    assert pq.read_metadata(table).metadata[b"unifilter.partition_key"] == b"shards_0000"
    assert not (root / "scores").exists()  # nothing in the catalog's folder
    assert not (shards / ".source.json").exists()

    # the scores are the engine's: equal to our own table's for the same tar
    assert _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--root", str(root)) == 0  # fmt: skip
    ours = pd.read_parquet(root / "scores" / "shards" / "00000000.parquet")
    assert ours["key"].tolist() == df["key"].tolist()
    assert ours["score"].fillna(-1).tolist() == df["quality_score"].fillna(-1).tolist()

    # resume works as for our tables: an up-to-date table is skipped, a changed tar is rescored
    capsys.readouterr()
    before = table.stat().st_mtime_ns
    assert _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-format", "original", "--root", str(root)) == 0  # fmt: skip
    assert "00000000.tar: 5 rows (ok 4, skipped 0, error 1), up to date, skipped" in capsys.readouterr().out
    assert table.stat().st_mtime_ns == before
    write_caption_tar(shards / "00000000.tar", n=2)
    assert _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-format", "original", "--root", str(root)) == 0  # fmt: skip
    assert len(pd.read_parquet(table)) == 2


def test_interleaved_tables_use_the_original_names_and_columns(tmp_path: Path, tiny_checkpoint: Path) -> None:
    shards = tmp_path / "mmc4"
    write_interleaved_tar(shards / "shard_7.tar", n=3)
    out = tmp_path / "out"
    code = _score("interleaved", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-format", "original", "--output-dir", str(out), "--batch-size", "1")  # fmt: skip
    assert code == 0
    df = pd.read_parquet(out / "00000007_quality_score.parquet")  # the original's name for shard_7.tar
    assert df["key"].tolist() == ["doc00000", "doc00001", "doc00002"]
    assert list(df.columns) == ["key", "status", "reason", "quality_score", "flags"]
    assert df["quality_score"].notna().all()
    assert (out / "00000007_quality_score.manifest.json").is_file()


def test_multi_label_heads_write_quality_class(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    from unifilter_core.modeling import init_checkpoint

    ckpt = init_checkpoint("tiny", tmp_path / "ckpt", tokenizer_dir=tiny_tokenizer_dir, seed=5,
                           overrides={"num_labels": 4})  # fmt: skip
    shards = tmp_path / "shards"
    write_caption_tar(shards / "00000000.tar", n=4)
    assert _score("caption", "--model-path", str(ckpt), "--tar-file-path", str(shards),
                  "--output-format", "original") == 0  # fmt: skip
    df = pd.read_parquet(shards / "00000000_quality_score.parquet")
    assert df["quality_class"].between(0, 3).all()
    assert df["quality_score"].between(0, 1).all()  # P(class 1), as the original reports
    assert df["expected_level"].between(0, 3).all()


def test_original_tables_never_go_into_the_catalog_folder(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    write_caption_tar(shards / "00000000.tar", n=2)
    root = tmp_path / "home"
    code = _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-format", "original", "--root", str(root),
                  "--output-dir", str(root / "scores" / "shards"))  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "unifilter: error:" in err and "catalog's score folder" in err and "--output-dir" in err
    assert not list(shards.glob("*_quality_score*")) and not (root / "scores" / "shards").exists()


# The two commands exactly as the original README prints them (in a file, so no tool strips the trailing spaces).
# The README ends the path line with "\ ", so the shell runs the lines up to it alone (a path with a trailing
# space, the script's defaults for the rest) and then tries "--gpu-id ..." as a command of its own, which fails:
# that is what running them verbatim does.
README_COMMANDS = (Path(__file__).parent / "original_readme_commands.sh").read_text()


@pytest.mark.slow
def test_the_original_readme_commands_run_verbatim(tmp_path: Path, tiny_checkpoint: Path) -> None:
    assert "filter\\ \n" in README_COMMANDS and "webdataset\\ \n" in README_COMMANDS  # kept byte for byte
    work = tmp_path / "UniFilter"
    work.mkdir()
    (work / "data_scoring").symlink_to(REPO / "data_scoring")
    _datacomp_shards(work / "data" / "datacomp" / "medium_vanilla_filter")
    write_interleaved_tar(work / "data" / "OBELICS" / "obelics_webdataset" / "00000003.tar", n=2)
    cache = tmp_path / "hf-cache"
    _cache_model(cache, "weizhiwang/UniFilter-Qwen2.5-1.5B", tiny_checkpoint)
    (work / "readme.sh").write_text(README_COMMANDS)
    bin_dir = Path(sys.executable).parent  # `python` is this environment's interpreter
    assert (bin_dir / "python").exists()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "UNIFILTER_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(REPO),  # this checkout, also when the installed package is another one
    }
    done = subprocess.run(
        ["bash", "readme.sh"], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    log = done.stdout + done.stderr
    assert log.count("--gpu-id: command not found") == 2, log  # the README's own line-continuation slip
    assert (work / "data/datacomp/medium_vanilla_filter/00000000_quality_score.parquet").is_file(), log
    caption = pd.read_parquet(work / "data/datacomp/medium_vanilla_filter/00000000_quality_score.parquet")
    assert caption["uid"].tolist() == [f"uid{i:09d}" for i in range(5)]
    assert caption["quality_score"].notna().sum() == 4
    assert (work / "data/datacomp/medium_vanilla_filter/00000001_quality_score.parquet").is_file()
    documents = pd.read_parquet(work / "data/OBELICS/obelics_webdataset/00000003_quality_score.parquet")
    assert documents["key"].tolist() == ["doc00000", "doc00001"] and documents["quality_score"].notna().all()
