"""Scoring on a two-node Ray cluster (``tests/ray_cluster.py``: two ``ray start`` processes in the test's own
network namespace): one resident model per actor, tables equal to a local run, a lost node's tar rescored."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.ray_cluster import can_unshare, run_in_cluster
from tests.test_scoring_engine import caption_members, write_tar
from unifilter_core.cli import main

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not can_unshare(), reason="needs `unshare -n` (root) for the cluster's network namespace"
    ),
]
pytest.importorskip("ray", reason="ray is an extra (pip install -e '.[ray]')")

COMPARED = ["key", "partition_key", "score", "status", "reason"]


def _cli(*args: str) -> list[str]:
    code = "import sys; from unifilter_core.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def _tables(folder: Path) -> dict[str, list[dict]]:
    return {p.name: pq.read_table(p).select(COMPARED).to_pylist() for p in sorted(folder.glob("*.parquet"))}


def _same_tables(a: dict[str, list[dict]], b: dict[str, list[dict]]) -> None:
    """Equal tables; scores to 1e-5 (a Ray actor runs torch with its own thread count, so sums differ in the
    last bits)."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert [{**r, "score": None} for r in a[name]] == [{**r, "score": None} for r in b[name]], name
        assert [r["score"] for r in a[name]] == pytest.approx([r["score"] for r in b[name]], abs=1e-5), name


def _local_run(shards: Path, ckpt: Path, out: Path) -> dict[str, list[dict]]:
    args = ["score", "caption", "--model-path", str(ckpt), "--tar-file-path", str(shards), "--output-dir", str(out),
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "4"]  # fmt: skip
    assert main(args) == 0
    return _tables(out)


def _run(work: Path, command: list[str], **spec) -> str:
    result = run_in_cluster({"workdir": str(work), "command": command, **spec})
    log = (work / "command.log").read_text() if (work / "command.log").exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert (work / "command.rc").read_text() == "0", log
    return log


def test_cli_scores_a_block_on_two_nodes_like_a_local_run(tmp_path: Path, tiny_checkpoint: Path) -> None:
    shards = tmp_path / "shards"
    for i in range(4):
        write_tar(shards / f"{i:08d}.tar", caption_members(6, seed=i))
    out = tmp_path / "ray_scores"
    args = ["score", "caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
            "--output-dir", str(out), "--ray-address", "127.0.0.1:6379", "--ray-workers", "2",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "4"]  # fmt: skip
    log = _run(tmp_path / "cluster", _cli(*args, "--root", str(tmp_path / "home")))
    assert "4 tar(s)" in log and "done: 4 tar(s), 24 rows" in log

    _same_tables(_tables(out), _local_run(shards, tiny_checkpoint, tmp_path / "local_scores"))
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("*.manifest.json"))]
    by = [m["scored_by"] for m in manifests]
    assert all(b["executor"] == "ray" and b["host"] for b in by)
    assert len({b["node_id"] for b in by}) == 2  # both nodes scored: one actor each
    assert len({b["pid"] for b in by}) == 2  # two resident models for four tars

    log = _run(tmp_path / "cluster2", _cli(*args, "--root", str(tmp_path / "home")))
    assert log.count("up to date, skipped") == 4


def test_a_lost_node_s_tar_is_rescored_on_the_other(tmp_path: Path, tiny_checkpoint: Path) -> None:
    shards = tmp_path / "shards"
    write_tar(shards / "00000000.tar", caption_members(1500, seed=0))
    write_tar(shards / "00000001.tar", caption_members(1500, seed=1))
    write_tar(shards / "00000002.tar", caption_members(4, seed=2))
    out = tmp_path / "ray_scores"
    args = ["score", "caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
            "--output-dir", str(out), "--ray-address", "127.0.0.1:6379", "--ray-workers", "2",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "1"]  # fmt: skip
    work = tmp_path / "cluster"
    # both big tars are being written when the worker node is killed: one of them was on that node
    pattern = "../ray_scores/.0000000[01].parquet.tmp-*"
    log = _run(work, _cli(*args, "--root", str(tmp_path / "home")), kill_worker_after=pattern, timeout=300)
    assert (work / "worker_killed").exists()
    assert "died" in log and "scoring it again" in log
    assert "done: 3 tar(s)" in log and "FAILED" not in log
    ray_tables = _tables(out)
    assert sorted(ray_tables) == ["00000000.parquet", "00000001.parquet", "00000002.parquet"]
    _same_tables(ray_tables, _local_run(shards, tiny_checkpoint, tmp_path / "local_scores"))
    assert not list(out.glob(".*.tmp-*"))


def test_workers_that_cannot_load_the_model_stop_the_run_with_one_line(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    import shutil

    ckpt = tmp_path / "broken_ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # config.json is fine: the driver's check passes
    shards = tmp_path / "shards"
    for i in range(2):
        write_tar(shards / f"{i:08d}.tar", caption_members(3, seed=i))
    args = ["score", "caption", "--model-path", str(ckpt), "--tar-file-path", str(shards),
            "--output-dir", str(tmp_path / "out"), "--ray-address", "127.0.0.1:6379", "--num-workers", "0",
            "--device", "cpu", "--no-progress", "--root", str(tmp_path / "home")]  # fmt: skip
    work = tmp_path / "cluster"
    result = run_in_cluster({"workdir": str(work), "command": _cli(*args), "timeout": 240})
    log = (work / "command.log").read_text()
    assert result.returncode == 0, result.stderr
    assert (work / "command.rc").read_text() == "2", log
    assert "a Ray worker could not load" in log and str(ckpt) in log
    assert not list((tmp_path / "out").glob("*.parquet"))
