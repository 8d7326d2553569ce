"""Scoring on a two-node Ray cluster (``tests/ray_cluster.py``: two ``ray start`` processes in the test's own
network namespace, token authentication): through the CLI and through a Dagster tar-group partition, one
resident model per actor (counted), tables equal to a local run, a lost node's tar rescored, no token leaked."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.ray_cluster import can_unshare, run_in_cluster
from tests.test_scoring_engine import caption_members, write_tar

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


def _same_tables(a: dict[str, list[dict]], b: dict[str, list[dict]], source: str | None = None) -> None:
    """Equal tables, scores to 1e-6 (the local run uses one CPU, as each actor does: same thread count);
    ``source`` renames ``a``'s source in its partition keys (the same tars under another source name)."""
    assert sorted(a) == sorted(b)
    for name in a:
        left = [{**r, "score": None} for r in a[name]]
        if source:
            left = [{**r, "partition_key": r["partition_key"].replace(source, "shards", 1)} for r in left]
        assert left == [{**r, "score": None} for r in b[name]], name
        assert [r["score"] for r in a[name]] == pytest.approx([r["score"] for r in b[name]], abs=1e-6), name


def _local_run(shards: Path, ckpt: Path, out: Path, batch: str = "4") -> dict[str, list[dict]]:
    """The same tars scored in one local process pinned to one CPU (one torch thread, as in a 1-CPU actor)."""
    args = ["score", "caption", "--model-path", str(ckpt), "--tar-file-path", str(shards), "--output-dir", str(out),
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--batch-size", batch]  # fmt: skip
    done = subprocess.run(["taskset", "-c", "0", *_cli(*args, "--root", str(out.parent / "local_home"))],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return _tables(out)


def _run(work: Path, command: list[str], **spec) -> str:
    result = run_in_cluster({"workdir": str(work), "command": command, **spec})
    log = (work / "command.log").read_text() if (work / "command.log").exists() else ""
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert (work / "command.rc").read_text() == "0", log
    return log


def _scored_by(folder: Path) -> list[dict]:
    return [json.loads(p.read_text())["scored_by"] for p in sorted(folder.glob("*.manifest.json"))]


def _assert_two_resident_models(by: list[dict]) -> None:
    """Both nodes scored; two actors (one per node) each loaded the model once for all its tars."""
    assert all(b["executor"] == "ray" and b["host"] for b in by)
    assert len({b["node_id"] for b in by}) == 2
    assert len({b["pid"] for b in by}) == 2
    assert {b["model_loads"] for b in by} == {1}


def _no_leak(token: str, *folders: Path) -> None:
    """The cluster's token appears in no file the run wrote (logs, manifests, tables, catalog)."""
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.name not in ("auth_token", "spec.json"):
                assert token.encode() not in path.read_bytes(), path


def test_cli_and_a_dagster_group_score_on_two_nodes_like_a_local_run(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    shards = tmp_path / "shards"
    group = tmp_path / "group_root"
    for i in range(8):
        write_tar(shards / f"{i:08d}.tar", caption_members(5 + i % 3, seed=i))
    shutil.copytree(shards, group / "sources" / "cap")  # the same tars, as a Dagster source
    out = tmp_path / "ray_scores"
    args = ["score", "caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(shards),
            "--output-dir", str(out), "--ray-address", "127.0.0.1:6379", "--ray-workers", "2",
            "--num-workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "4",
            "--root", str(tmp_path / "home")]  # fmt: skip
    dagster_run = [sys.executable, "-m", "tests.ray_group_run", str(group), str(tiny_checkpoint), "8"]
    both = ["bash", "-c", 'set -e; "$@"; echo ===; exec ' + shlex.join(dagster_run), "cli", *_cli(*args)]
    work = tmp_path / "cluster"
    log = _run(work, both, try_without_token=True, timeout=400)
    assert "8 tar(s)" in log and "done: 8 tar(s)" in log
    assert "group cap_0000-0007: success=True tars=8" in log
    assert (work / "untokened.rc").read_text() != "0", (work / "untokened.log").read_text()

    local = _local_run(shards, tiny_checkpoint, tmp_path / "local_scores")
    _same_tables(_tables(out), local)
    _assert_two_resident_models(_scored_by(out))
    group_tables = group / "scores" / "cap"
    _same_tables(_tables(group_tables), local, source="cap")
    _assert_two_resident_models(_scored_by(group_tables))
    stats = duckdb.connect(str(group / "unifilter.duckdb"), read_only=True).execute(
        "SELECT count(*), sum(n_rows) FROM score_stats").fetchone()  # fmt: skip
    assert stats == (8, sum(5 + i % 3 for i in range(8)))  # per-tar statistics reached the catalog
    _no_leak((work / "auth_token").read_text(), work, out, group, tmp_path / "home")

    log = _run(tmp_path / "cluster2", _cli(*args))
    assert log.count("up to date, skipped") == 8


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
    _same_tables(ray_tables, _local_run(shards, tiny_checkpoint, tmp_path / "local_scores", batch="1"))
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
