"""Scoring tars that live in an S3 bucket into score tables in the bucket, against a real S3-protocol server.

The server is moto's server mode on 127.0.0.1 (``tests/storage/conftest.py``); the code reaches it only
through the standard ``AWS_*`` environment.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.storage.conftest import FAKE_KEY_ID, FAKE_SECRET, child_env
from tests.tarfixtures import truncate_file
from tests.test_scoring_engine import caption_members, write_tar
from unifilter_core import storage
from unifilter_core.cli import main

COMPARED = ["key", "partition_key", "score", "status", "reason", "uid", "url", "n_tokens"]


def _fs():
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    return fs


def _score(*args: str) -> int:
    return main(["score", *args, "--no-progress", "--device", "cpu"])


def _upload_shards(bucket: str, local: Path, prefix: str = "shards") -> str:
    fs = _fs()
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"{bucket}/{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def _rows(table) -> list[dict]:
    return table.select(COMPARED).to_pylist()


def _bucket_tables(bucket: str, prefix: str = "scores") -> dict[str, list[dict]]:
    fs = _fs()
    out = {}
    for name in sorted(fs.ls(f"{bucket}/{prefix}")):
        if name.endswith(".parquet"):
            with fs.open(name, "rb") as handle:
                out[Path(name).name] = _rows(pq.read_table(handle))
    return out


def _local_tables(folder: Path) -> dict[str, list[dict]]:
    return {p.name: _rows(pq.read_table(p)) for p in sorted(folder.glob("*.parquet"))}


def _committed_only(bucket: str, prefix: str = "scores") -> set[str]:
    """The table names a reader may trust; asserts that no table object stands without its manifest."""
    fs = _fs()
    names = {Path(n).name for n in fs.ls(f"{bucket}/{prefix}")} if fs.exists(f"{bucket}/{prefix}") else set()
    tables = {n for n in names if n.endswith(".parquet")}
    for table in tables:
        stem = table.split(".")[0]
        assert f"{stem}.manifest.json" in names, f"{table} is visible without its manifest"
        manifest = json.loads(fs.cat(f"{bucket}/{prefix}/{stem}.manifest.json"))
        assert manifest["table"]["bytes"] == fs.info(f"{bucket}/{prefix}/{table}")["size"]
    return tables


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    folder = tmp_path / "shards"
    for i in range(3):
        write_tar(folder / f"{i:08d}.tar", caption_members(3 + i, seed=i))
    (folder / "notes.txt").write_text("not a shard")
    return folder


def test_cli_scores_s3_shards_into_s3_like_local_and_resumes(
    bucket: str, shards: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = _upload_shards(bucket, shards)
    common = ["--model-path", str(tiny_checkpoint), "--root", str(tmp_path / "home"), "--batch-size", "2"]
    assert _score("caption", *common, "--tar-file-path", url, "--output-dir", f"s3://{bucket}/scores/") == 0
    first = capsys.readouterr()
    assert "3 tar(s)" in first.out and f"-> s3://{bucket}/scores" in first.out

    local_out = tmp_path / "local_scores"
    args = ["--tar-file-path", str(shards), "--output-dir", str(local_out), "--source", "shards"]
    assert _score("caption", *common, *args) == 0
    capsys.readouterr()
    remote = _bucket_tables(bucket)
    assert remote == _local_tables(local_out)  # same rows, same scores, same partition keys
    assert sorted(remote) == ["00000000.parquet", "00000001.parquet", "00000002.parquet"]
    assert _committed_only(bucket) == set(remote)

    fs = _fs()
    manifest = json.loads(fs.cat(f"{bucket}/scores/00000001.manifest.json"))
    assert manifest["tar"]["path"] == f"s3://{bucket}/shards/00000001.tar"
    assert manifest["tar"]["fingerprint"].startswith("etag:")
    assert manifest["listing"]["missing_keys"] == 0 and manifest["table"]["rows"] == 4
    marker = json.loads(fs.cat(f"{bucket}/scores/.source.json"))
    assert marker == {"input": url, "source": "shards"}
    for name in fs.ls(f"{bucket}/scores"):  # credentials never reach what is written
        text = fs.cat(name).decode("latin-1")
        assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    assert not [n for n in fs.ls(f"{bucket}/scores") if "write-check" in n or ".tmp" in n]

    assert _score("caption", *common, "--tar-file-path", url, "--output-dir", f"s3://{bucket}/scores") == 0
    again = capsys.readouterr().out
    assert again.count("up to date, skipped") == 3
    assert FAKE_SECRET not in first.out + first.err + again


def test_decode_workers_stream_from_s3(
    bucket: str, shards: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Forked decode workers open the store themselves (fsspec after fork)."""
    url = _upload_shards(bucket, shards)
    common = ["--model-path", str(tiny_checkpoint), "--root", str(tmp_path / "home")]
    assert _score("caption", *common, "--num-workers", "2", "--tar-file-path", url,
                  "--output-dir", f"s3://{bucket}/scores") == 0  # fmt: skip
    assert _score("caption", *common, "--num-workers", "2", "--tar-file-path", str(shards),
                  "--output-dir", str(tmp_path / "local"), "--source", "shards") == 0  # fmt: skip
    assert _bucket_tables(bucket) == _local_tables(tmp_path / "local")


def test_truncated_tar_on_s3_gets_a_tar_truncated_row(
    bucket: str, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    folder = tmp_path / "cut"
    tar = write_tar(folder / "00000005.tar", caption_members(4, seed=5))
    truncate_file(tar, 0.6)
    url = _upload_shards(bucket, folder)
    code = _score("caption", "--model-path", str(tiny_checkpoint), "--num-workers", "0",
                  "--tar-file-path", url, "--output-dir", f"s3://{bucket}/scores")  # fmt: skip
    assert code == 0
    rows = _bucket_tables(bucket)["00000005.parquet"]
    assert "tar_truncated" in {r["reason"] for r in rows}
    assert any(r["status"] == "ok" for r in rows)  # what was read before the cut is scored


def test_unwritable_bucket_is_one_clear_line(
    s3_env: dict[str, str], shards: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _score("caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
                  "--output-dir", "s3://no-such-bucket-unifilter/scores")  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0
    assert "s3://no-such-bucket-unifilter/scores" in err and "not writable" in err
    assert FAKE_SECRET not in err


_KILL_SCRIPT = """
import sys
from unifilter_core import storage
from unifilter_core.cli import main
sys.exit(main(["score", "caption", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_sigkill_mid_tar_leaves_no_table_without_manifest_and_rerun_equals_clean_run(
    bucket: str, s3_env: dict[str, str], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    folder = tmp_path / "shards"
    write_tar(folder / "00000000.tar", caption_members(2, seed=0))
    write_tar(folder / "00000001.tar", caption_members(2000, seed=1))
    write_tar(folder / "00000002.tar", caption_members(2, seed=2))
    url = _upload_shards(bucket, folder)
    args = ["--model-path", str(tiny_checkpoint), "--tar-file-path", url, "--output-dir",
            f"s3://{bucket}/scores", "--root", str(tmp_path / "home"), "--batch-size", "1",
            "--num-workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    child_tmp = tmp_path / "child_tmp"  # the child's staging folders land here
    child_tmp.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, *args],
        env={**child_env(s3_env), "TMPDIR": str(child_tmp)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )
    deadline = time.monotonic() + 180
    try:  # kill once tar 1's table is being written in the staging folder
        while not list(child_tmp.glob("unifilter-stage-*/.00000001.parquet.tmp-*")):
            assert child.poll() is None, child.stdout.read().decode() if child.stdout else ""
            assert time.monotonic() < deadline, "tar 1 never started"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert list(child_tmp.glob("unifilter-stage-*/.00000001.parquet.tmp-*"))  # it died mid-tar
    assert _committed_only(bucket) == {"00000000.parquet"}  # nothing of tar 1 is visible, tar 0 is whole
    fs = _fs()
    assert not [n for n in fs.ls(f"{bucket}/scores") if "00000001" in n or "00000002" in n]

    assert main(["score", "caption", *args]) == 0
    assert main(["score", "caption", *[a if a != f"s3://{bucket}/scores" else f"s3://{bucket}/clean"
                                      for a in args]]) == 0  # fmt: skip
    resumed, clean = _bucket_tables(bucket, "scores"), _bucket_tables(bucket, "clean")
    assert sorted(resumed) == ["00000000.parquet", "00000001.parquet", "00000002.parquet"]
    assert resumed == clean
    assert _committed_only(bucket) == set(resumed)


def test_a_table_committed_by_another_process_is_seen_as_complete(
    bucket: str, shards: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """fsspec caches listings per process: a table another process committed after this one listed the folder
    must still count as up to date (not be rescored)."""
    import fsspec

    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import score_tar

    url = _upload_shards(bucket, shards)
    fs = _fs()
    fs.mkdir(f"{bucket}/scores")
    fs.pipe(f"{bucket}/scores/.keep", b"")
    fs.ls(f"{bucket}/scores")  # this process now holds a listing without the table
    other = fsspec.filesystem("s3", skip_instance_cache=True)  # "another process": its own client and cache
    local = tmp_path / "made_elsewhere"
    scorer = load_scorer(tiny_checkpoint, device="cpu", num_workers=0)
    summary = score_tar(
        f"{url}/00000001.tar", scorer, local / "00000001.parquet", kind="caption", source="shards"
    )
    assert summary.rows == 4 and summary.tar_path == storage.location(f"{url}/00000001.tar")
    other.put_file(str(local / "00000001.parquet"), f"{bucket}/scores/00000001.parquet")
    other.put_file(str(local / "00000001.manifest.json"), f"{bucket}/scores/00000001.manifest.json")

    again = score_tar(f"{url}/00000001.tar", scorer, f"s3://{bucket}/scores/00000001.parquet", kind="caption",
                      source="shards")  # fmt: skip
    assert again.resumed
