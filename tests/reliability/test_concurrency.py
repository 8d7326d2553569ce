"""Eight partitions materialized at once by eight processes against one catalog and one Dagster instance."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.reliability.conftest import catalog_counts, make_resources, materialize
from tests.tarfixtures import write_caption_tar, write_interleaved_tar

N_PARTITIONS = 8

_CHILD = r"""
import sys, time
from pathlib import Path
import dagster as dg
from tests.reliability.conftest import make_resources, failure_message
from unifilter_dagster.assets.tars import scores
root, ckpt, partition, go = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
res = make_resources(root, ckpt, [("cap", "caption"), ("doc", "interleaved")])
model = res["scoring_model"]
model.load(root, model.settings("caption"))  # imports and weights read once: every process then hits the catalog at about once
print("READY", flush=True)
while not go.exists():
    time.sleep(0.01)
with dg.DagsterInstance.get() as instance:
    result = dg.materialize([scores], resources=res, instance=instance, partition_key=partition,
                            raise_on_error=False)
print("SUCCESS" if result.success else "FAILED\n" + failure_message(result), flush=True)
"""


@pytest.mark.slow
def test_eight_partitions_in_parallel_processes(tmp_path: Path, rel_ckpt: Path, run_child) -> None:
    import dagster as dg

    from unifilter_dagster.assets.tars import tar_manifest

    root = tmp_path / "root"
    for i in range(N_PARTITIONS // 2):
        write_caption_tar(root / f"sources/cap/{i:08d}.tar", n=3, start=10 * i)
        write_interleaved_tar(root / f"sources/doc/{i:08d}.tar", n=2)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {"DAGSTER_HOME": str(home)}
    resources = make_resources(root, rel_ckpt, [("cap", "caption"), ("doc", "interleaved")])
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert materialize([tar_manifest], resources, instance).success
        keys = sorted(instance.get_dynamic_partitions("tars"))
    assert len(keys) == N_PARTITIONS

    go = tmp_path / "go"
    children = [run_child(_CHILD, str(root), str(rel_ckpt), key, str(go), env=env) for key in keys]
    for child in children:
        child.wait_for(lambda c=child: "READY" in c.output(), timeout=150)
    go.touch()
    started = time.monotonic()
    for child in children:
        assert child.wait(timeout=180) == 0, child.output()
    outputs = [c.output() for c in children]
    assert all("SUCCESS" in out for out in outputs), "\n\n".join(outputs)
    for out in outputs:  # nothing about locks reaches the user, not even as a warning
        assert "CatalogBusyError" not in out and "database is locked" not in out.lower(), out
        assert "Could not set lock" not in out, out

    db = root / "unifilter.duckdb"
    counts = catalog_counts(db)
    assert counts["tars"] == counts["score_stats"] == N_PARTITIONS
    assert counts["dup_stats"] == counts["dup_lineage"] == counts["orphan_stats"] == 0
    conn = duckdb.connect(str(db), read_only=True)
    try:
        lineage = conn.execute(
            "SELECT partition_key, count(*) FROM lineage WHERE asset_key = 'scores' GROUP BY 1 ORDER BY 1"
        ).fetchall()
        history = conn.execute(
            "SELECT count(*), count(DISTINCT run_id) FROM lineage_history WHERE asset_key = 'scores'"
        ).fetchone()
        stats_rows = conn.execute("SELECT sum(n_rows) FROM score_stats").fetchone()[0]
    finally:
        conn.close()
    assert lineage == [(k, 1) for k in keys]
    assert history == (N_PARTITIONS, N_PARTITIONS)
    assert stats_rows == (N_PARTITIONS // 2) * (3 + 2)
    with dg.DagsterInstance.from_config(str(home)) as instance:  # the instance saw eight successful runs
        runs = instance.get_runs()
        assert len([r for r in runs if r.status == dg.DagsterRunStatus.SUCCESS]) == N_PARTITIONS + 1
    print(f"8 partitions materialized concurrently in {time.monotonic() - started:.1f}s")


# --------------------------------------------------------------------------------------------- one tar, two runs
_SAME_TAR_CHILD = r"""
import logging, sys, time
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from unifilter_core.scorer import load_scorer
from unifilter_core.scoring import ScoringConfig, score_tar
tar, out, ckpt, go = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
scorer = load_scorer(ckpt, batch_size=2)
forward = scorer.forward
def slow_forward(batch):  # instrumentation: a slow model, so the runs overlap
    time.sleep(0.05)
    return forward(batch)
scorer.forward = slow_forward
print("READY", flush=True)
while not go.exists():
    time.sleep(0.01)
config = ScoringConfig(batch_size=2, num_workers=0, row_group_size=4, torch_threads=1)
summary = score_tar(tar, scorer, out, kind="caption", source="s", config=config, progress=False)
print("RESUMED" if summary.resumed else "SCORED", summary.rows, flush=True)
"""


@pytest.mark.slow
def test_two_runs_scoring_the_same_tar_into_one_folder(tmp_path: Path, rel_ckpt: Path, run_child) -> None:
    """The second run waits for the first (it once deleted the first's live temp file), then skips the tar."""
    tar = write_caption_tar(tmp_path / "src" / "00000001.tar", n=30)
    out = tmp_path / "out" / "00000001.parquet"
    go_a, go_b = tmp_path / "go-a", tmp_path / "go-b"
    a = run_child(_SAME_TAR_CHILD, str(tar), str(out), str(rel_ckpt), str(go_a))
    b = run_child(_SAME_TAR_CHILD, str(tar), str(out), str(rel_ckpt), str(go_b))
    for child in (a, b):
        child.wait_for(lambda c=child: "READY" in c.output(), timeout=90)
    go_a.touch()
    a.wait_for(lambda: any(out.parent.glob(".00000001.parquet.tmp-*")), timeout=60)  # a is writing its table
    go_b.touch()
    assert a.wait(timeout=120) == 0, a.output()
    assert b.wait(timeout=120) == 0, b.output()
    assert "SCORED 30" in a.output() and "RESUMED 30" in b.output(), (a.output(), b.output())
    assert "waiting for another run scoring" in b.output()
    assert pq.read_table(out).num_rows == 30
    assert sorted(p.name for p in out.parent.iterdir()) == ["00000001.manifest.json", "00000001.parquet"]


_WRITER_CHILD = r"""
import json, sys, time
from pathlib import Path
import unifilter_core.data.writer as writer
real = writer.iter_raw_samples
def slow(*args, **kwargs):  # instrumentation: a slow source, so the writes overlap
    for raw in real(*args, **kwargs):
        time.sleep(0.02)
        yield raw
writer.iter_raw_samples = slow
go = Path(sys.argv[4])
while not go.exists():
    time.sleep(0.01)
summary = writer.write_filtered_tar(sys.argv[1], set(json.loads(sys.argv[2])), sys.argv[3])
print("DONE", summary.kept, flush=True)
"""


@pytest.mark.slow
def test_two_filtered_writers_of_one_output(tmp_path: Path, run_child) -> None:
    """A writer whose temp file looks old (a slow source) is never cleaned away by a second writer."""
    from unifilter_core.data import write_filtered_tar

    src = write_caption_tar(tmp_path / "src" / "00000001.tar", n=40)
    keep = sorted(f"{i:09d}" for i in range(0, 40, 2))
    clean = tmp_path / "clean" / "00000001.tar"
    write_filtered_tar(src, set(keep), clean)
    out = tmp_path / "filtered" / "00000001.tar"
    go_a, go_b = tmp_path / "go-a", tmp_path / "go-b"
    a = run_child(_WRITER_CHILD, str(src), json.dumps(keep), str(out), str(go_a))
    b = run_child(_WRITER_CHILD, str(src), json.dumps(keep), str(out), str(go_b))
    go_a.touch()
    a.wait_for(lambda: any(out.parent.glob(".00000001.tar.*.tmp")), timeout=60)
    for tmp in out.parent.glob(".00000001.tar.*.tmp"):
        os.utime(tmp, (time.time() - 3600, time.time() - 3600))  # untouched for an hour, still live
    go_b.touch()
    assert a.wait(timeout=60) == 0 and "DONE 20" in a.output(), a.output()
    assert b.wait(timeout=60) == 0 and "DONE 20" in b.output(), b.output()
    assert out.read_bytes() == clean.read_bytes()
    assert sorted(p.name for p in out.parent.iterdir()) == ["00000001.tar"]
