"""SIGKILL at seeded random points of scoring, of the filtered-tar writer and of catalog writes; then rerun."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.catalog_pause import PAUSE_ENV
from tests.reliability.conftest import catalog_counts, make_resources, materialize
from tests.tarfixtures import caption_members, jpeg_bytes, write_caption_tar, write_tar
from unifilter_core.catalog import Catalog, TarRecord

# --------------------------------------------------------------------------------------------- scoring process
_SCORE_CHILD = r"""
import sys, time
from unifilter_core.scorer import load_scorer
from unifilter_core.scoring import ScoringConfig, score_tar
tar, out, ckpt, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
scorer = load_scorer(ckpt, batch_size=2)
forward = scorer.forward
def slow_forward(batch):  # instrumentation: a slower model so the kill lands inside the partition
    time.sleep(0.03)
    return forward(batch)
scorer.forward = slow_forward
print("READY", flush=True)
config = ScoringConfig(batch_size=2, num_workers=workers, row_group_size=4, torch_threads=1, worker_chunk=2)
score_tar(tar, scorer, out, kind="caption", source="crash", config=config, progress=False)
print("DONE", flush=True)
"""


def _score_config(workers: int = 0):
    from unifilter_core.scoring import ScoringConfig

    return ScoringConfig(batch_size=2, num_workers=workers, row_group_size=4, torch_threads=1, worker_chunk=2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_scoring_killed_at_random_points_reruns_to_the_clean_table(
    tmp_path: Path, rel_ckpt: Path, run_child
) -> None:
    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import read_manifest, score_tar

    tar = write_caption_tar(tmp_path / "src" / "00000001.tar", n=40)
    scorer = load_scorer(rel_ckpt, batch_size=2)
    clean = tmp_path / "clean" / "00000001.parquet"
    score_tar(tar, scorer, clean, kind="caption", source="crash", config=_score_config(), progress=False)
    clean_manifest = read_manifest(clean.with_name("00000001.manifest.json"))

    rng = random.Random(1234)
    out = tmp_path / "out" / "00000001.parquet"
    for point in range(3):
        workers = point % 2  # in-process decoding and one decode worker
        child = run_child(_SCORE_CHILD, str(tar), str(out), str(rel_ckpt), str(workers))
        child.wait_for(lambda c=child: "READY" in c.output())
        time.sleep(rng.uniform(0.05, 0.8))
        if point == 2:  # only the main process dies: its decode workers must notice and exit
            os.kill(child.proc.pid, signal.SIGKILL)
            child.proc.wait()
            deadline = time.monotonic() + 20
            while _group_alive(child.proc.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _group_alive(child.proc.pid), "orphaned decode workers outlived the scorer"
        else:
            child.kill()
        assert "DONE" not in child.output(), "killed too late: the test did not interrupt scoring"
        # whatever is left under a final name is a complete table; partial data only under hidden temp names
        for path in out.parent.glob("*"):
            if path.name.endswith(".parquet"):
                assert pq.read_table(path).num_rows == 40, path
            else:
                assert path.name.startswith(".") or path.name.endswith(".manifest.json"), path
        leftovers = sorted(p.name for p in out.parent.glob(".*"))
        summary = score_tar(tar, scorer, out, kind="caption", source="crash", config=_score_config())
        assert summary.rows == 40
        assert sorted(p.name for p in out.parent.iterdir()) == [
            "00000001.manifest.json",
            "00000001.parquet",
        ], f"temp files after rerun (left by the kill: {leftovers})"
        assert pq.read_table(out).equals(pq.read_table(clean))
        assert out.read_bytes() == clean.read_bytes(), "same inputs and config: byte-identical parquet"
        manifest = read_manifest(out.with_name("00000001.manifest.json"))
        for key in ("tar", "model_fingerprint", "config_hash", "counts"):
            assert manifest[key] == clean_manifest[key], key
        out.unlink()  # next kill point starts from an empty folder again
        out.with_name("00000001.manifest.json").unlink()


# --------------------------------------------------------------------------------------------- filtered writer
_WRITER_CHILD = r"""
import json, sys, time
import unifilter_core.data.writer as writer
real = writer.iter_raw_samples
def slow(*args, **kwargs):  # instrumentation: a slow disk, so the kill lands inside the write
    for raw in real(*args, **kwargs):
        time.sleep(0.01)
        yield raw
writer.iter_raw_samples = slow
print("START", flush=True)
writer.write_filtered_tar(sys.argv[1], set(json.loads(sys.argv[2])), sys.argv[3])
print("DONE", flush=True)
"""


def _big_tar(path: Path, n: int = 120) -> Path:
    members = []
    for i in range(n):
        members += caption_members(f"{i:06d}", image=jpeg_bytes((64, 64), (i % 256, 10, 200)), text=f"c {i}")
    return write_tar(path, members)


@pytest.mark.slow
def test_filtered_writer_killed_mid_write_reruns_byte_identical(tmp_path: Path, run_child) -> None:
    from unifilter_core.data import write_filtered_tar

    src = _big_tar(tmp_path / "src" / "00000001.tar")
    keep = {f"{i:06d}" for i in range(0, 120, 3)}
    clean = tmp_path / "clean" / "00000001.tar"
    write_filtered_tar(src, keep, clean)
    out_dir = tmp_path / "filtered"
    out = out_dir / "00000001.tar"
    previous = write_filtered_tar(src, {"000000"}, out)  # an older version (another threshold) is in place
    assert previous.kept == 1
    old_bytes = out.read_bytes()

    rng = random.Random(7)
    for _ in range(3):
        child = run_child(_WRITER_CHILD, str(src), json.dumps(sorted(keep)), str(out))

        def temp_has_data() -> bool:
            return any(p.stat().st_size > 0 for p in out_dir.glob(".00000001.tar.*.tmp"))

        child.wait_for(temp_has_data)
        time.sleep(rng.uniform(0.0, 0.6))
        child.kill()
        assert "DONE" not in child.output()
        assert out.read_bytes() == old_bytes, "the previous complete file is untouched"
        assert sorted(p.name for p in out_dir.glob("*.tar")) == ["00000001.tar"], "no partial *.tar"

    write_filtered_tar(src, keep, out)
    assert out.read_bytes() == clean.read_bytes()
    # the killed writers' temp files stay behind (hidden, never named *.tar): see docs/reliability.md
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in out_dir.iterdir() if p != out)


# --------------------------------------------------------------------------------------------- catalog writes
_CATALOG_CHILD = r"""
import tests.catalog_pause  # the crash tests' pause point (from $UNIFILTER_TEST_CATALOG_PAUSE)
import sys
from unifilter_core.catalog import Catalog, TarRecord
op, db, root = sys.argv[1], sys.argv[2], sys.argv[3]
cat = Catalog(db, root=root)
if op == "register_tars":
    cat.register_tars([TarRecord(f"src_{i:04d}", "src", f"/d/{i:08d}.tar", "caption", 10, 0.0) for i in range(1, 9)])
elif op == "score_stats":
    cat.record_score_stats("src_0002", root + "/scores/src/00000002.parquet")
elif op == "lineage":
    cat.record_lineage("scores", "src_0001", "run-new", status="success", row_count=2)
print("DONE", flush=True)
"""
_STAGES = {
    "register_tars": ["register_tars_mid", "before_commit"],
    "score_stats": ["score_stats_mid", "before_commit"],
    "lineage": ["lineage_mid", "before_commit"],
}


def _score_parquet(root: Path, num: int, scores: list[float]) -> Path:
    import pyarrow as pa

    n = len(scores)
    path = root / "scores" / "src" / f"{num:08d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "source": ["src"] * n,
            "partition_key": [f"src_{num:04d}"] * n,
            "uid": [None] * n,
            "url": [None] * n,
            "score": pa.array(scores, pa.float32()),
            "status": ["ok"] * n,
            "reason": pa.array([None] * n, pa.string()),
            "n_images": pa.array([1] * n, pa.int32()),
            "n_tokens": pa.array([5] * n, pa.int32()),
            "truncated": [False] * n,
            "model_fingerprint": ["m"] * n,
            "detail": pa.array([None] * n, pa.string()),
        }
    )
    pq.write_table(table, path)
    return path


def _snapshot(db: Path) -> dict[str, list]:
    conn = duckdb.connect(str(db), read_only=True)
    try:
        return {
            "tars": conn.execute("SELECT partition_key, path FROM tars ORDER BY 1").fetchall(),
            "stats": conn.execute(
                "SELECT partition_key, n_rows, mean FROM score_stats ORDER BY 1"
            ).fetchall(),
            "lineage": conn.execute(
                "SELECT asset_key, partition_key, run_id FROM lineage ORDER BY 2"
            ).fetchall(),
            "history": conn.execute("SELECT run_id FROM lineage_history ORDER BY 1").fetchall(),
        }
    finally:
        conn.close()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_catalog_write_killed_inside_its_transaction(tmp_path: Path, run_child, seed: int) -> None:
    rng = random.Random(seed)
    op = ["register_tars", "score_stats", "lineage"][seed]
    stage = rng.choice(_STAGES[op])
    root = tmp_path / "root"
    db = root / "unifilter.duckdb"
    cat = Catalog(db, root=root)
    cat.register_tars([TarRecord("src_0001", "src", "/d/00000001.tar", "caption", 10, 0.0),
                       TarRecord("src_0002", "src", "/d/00000002.tar", "caption", 10, 0.0)])  # fmt: skip
    cat.record_score_stats("src_0001", _score_parquet(root, 1, [0.5, 1.5]))
    cat.record_score_stats("src_0002", _score_parquet(root, 2, [1.0]))
    cat.record_lineage("scores", "src_0001", "run-old", status="success", row_count=2)
    _score_parquet(root, 2, [1.0, 2.0, 3.0])  # the rescored table the child records
    before = _snapshot(db)

    marker = tmp_path / "paused"
    child = run_child(_CATALOG_CHILD, op, str(db), str(root), env={PAUSE_ENV: f"{stage}:{marker}"})
    child.wait_for(marker.exists)
    child.kill()
    assert _snapshot(db) == before, f"{op} killed at {stage}: the transaction must leave no trace"

    rerun = run_child(_CATALOG_CHILD, op, str(db), str(root))
    assert rerun.wait() == 0 and "DONE" in rerun.output(), rerun.output()
    after = _snapshot(db)
    counts = catalog_counts(db)
    assert counts["dup_tars"] == counts["dup_stats"] == counts["dup_lineage"] == 0
    assert counts["orphan_stats"] == counts["orphan_lineage"] == 0
    if op == "register_tars":
        assert len(after["tars"]) == 8
    elif op == "score_stats":
        assert ("src_0002", 3, 2.0) in after["stats"] and len(after["stats"]) == 2
    else:
        assert after["lineage"] == [("scores", "src_0001", "run-new")]
        assert after["history"] == [("run-new",), ("run-old",)]


_ASSET_CHILD = r"""
import tests.catalog_pause  # the crash tests' pause point (from $UNIFILTER_TEST_CATALOG_PAUSE)
import sys
import dagster as dg
from tests.reliability.conftest import make_resources
from unifilter_dagster.assets.tars import scores
root, ckpt = sys.argv[1], sys.argv[2]
from pathlib import Path
with dg.DagsterInstance.ephemeral() as instance:
    instance.add_dynamic_partitions("tars", ["crash_0001"])
    res = make_resources(Path(root), Path(ckpt), [("crash", "caption")])
    dg.materialize([scores], resources=res, instance=instance, partition_key="crash_0001")
print("DONE", flush=True)
"""


@pytest.mark.slow
def test_scores_asset_killed_in_its_catalog_write_then_rematerialized(
    tmp_path: Path, rel_ckpt: Path, run_child
) -> None:
    import dagster as dg

    from unifilter_dagster.assets.tars import scores, tar_manifest

    root = tmp_path / "root"
    write_caption_tar(root / "sources/crash/00000001.tar", n=5)
    resources = make_resources(root, rel_ckpt, [("crash", "caption")])
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
    for stage in ("score_stats_mid", "lineage_mid"):
        marker = tmp_path / f"paused-{stage}"
        child = run_child(_ASSET_CHILD, str(root), str(rel_ckpt), env={PAUSE_ENV: f"{stage}:{marker}"})
        child.wait_for(marker.exists, timeout=90)
        child.kill()
    counts = catalog_counts(root / "unifilter.duckdb")
    assert counts["score_stats"] == 1 and counts["lineage"] == 1  # tar_manifest's lineage + the stats
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tars", ["crash_0001"])
        assert materialize([scores], resources, instance, "crash_0001").success
        assert materialize([scores], resources, instance, "crash_0001").success  # and once more
    counts = catalog_counts(root / "unifilter.duckdb")
    assert counts["score_stats"] == 1 and counts["lineage"] == 2 and counts["tars"] == 1
    assert counts["dup_stats"] == counts["dup_lineage"] == counts["orphan_stats"] == 0
    assert pq.read_table(root / "scores/crash/00000001.parquet").num_rows == 5


# --------------------------------------------------------------------------------------------- decode worker deaths
def _crash_config(start_method: str = "fork"):
    from unifilter_core.scoring import ScoringConfig

    return ScoringConfig(
        batch_size=4, num_workers=2, worker_chunk=4, worker_timeout_s=0.3, start_method=start_method
    )


def _score_with(tmp_path: Path, rel_ckpt: Path, actions: dict[str, str], n: int = 40, **kw):
    from tests.crashing import MisbehavingProcessor, ScorerWith
    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import score_tar

    tar = write_caption_tar(tmp_path / "src" / "00000001.tar", n=n)
    scorer = load_scorer(rel_ckpt, batch_size=4)
    proxy = ScorerWith(scorer, MisbehavingProcessor(scorer.processor, actions, kw.pop("once_marker", None)))
    out = tmp_path / "out" / "00000001.parquet"
    summary = score_tar(tar, proxy, out, kind="caption", source="crash", progress=False, **kw)
    return summary, pq.read_table(out).to_pylist()


@pytest.mark.parametrize(
    ("action", "reason", "detail"),
    [
        ("exit", "worker_crash", "exit code 9"),
        ("sigkill", "worker_crash", "killed by signal SIGKILL"),
        ("memory", "internal_error", "MemoryError: simulated allocation failure"),
    ],
)
def test_a_sample_that_kills_its_decode_worker_costs_only_its_row(
    tmp_path: Path, rel_ckpt: Path, action: str, reason: str, detail: str
) -> None:
    summary, rows = _score_with(tmp_path, rel_ckpt, {"caption 17": action}, config=_crash_config())
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(40)], "every sample, in tar order"
    assert summary.rows == 40 and summary.by_status == {"ok": 39, "error": 1}
    assert (rows[17]["reason"], rows[17]["score"]) == (reason, None)
    assert detail in rows[17]["detail"]
    assert all(r["status"] == "ok" for i, r in enumerate(rows) if i != 17)


def test_two_deadly_samples_in_different_chunks(tmp_path: Path, rel_ckpt: Path) -> None:
    actions = {"caption 5": "exit", "caption 30": "sigkill"}
    summary, rows = _score_with(tmp_path, rel_ckpt, actions, config=_crash_config())
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(40)]
    assert [i for i, r in enumerate(rows) if r["status"] != "ok"] == [5, 30]
    assert {rows[5]["reason"], rows[30]["reason"]} == {"worker_crash"}
    assert summary.by_reason == {"worker_crash": 2}


def test_a_transient_worker_death_costs_no_row(tmp_path: Path, rel_ckpt: Path) -> None:
    """The OOM killer strikes once: the retried sample (alone, in a fresh process) is scored."""
    marker = tmp_path / "crashed-once"
    summary, rows = _score_with(
        tmp_path, rel_ckpt, {"caption 22": "exit_once"}, config=_crash_config(), once_marker=str(marker)
    )
    assert marker.exists(), "the worker did die once"
    assert summary.by_status == {"ok": 40} and [r["key"] for r in rows] == [f"{i:09d}" for i in range(40)]


def test_a_deadly_last_sample_in_a_short_last_chunk(tmp_path: Path, rel_ckpt: Path) -> None:
    summary, rows = _score_with(tmp_path, rel_ckpt, {"caption 9": "exit"}, n=10, config=_crash_config())
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(10)]
    assert rows[9]["reason"] == "worker_crash" and summary.rows == 10


@pytest.mark.slow
def test_a_deadly_sample_with_spawned_workers(tmp_path: Path, rel_ckpt: Path) -> None:
    """Spawned workers (the start method once CUDA is initialised) recover the same way."""
    summary, rows = _score_with(
        tmp_path, rel_ckpt, {"caption 6": "exit"}, n=12, config=_crash_config("spawn")
    )
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(12)]
    assert rows[6]["reason"] == "worker_crash" and summary.by_status == {"ok": 11, "error": 1}
