"""Eight partitions materialized at once by eight processes against one catalog and one Dagster instance."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb

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
res["scoring_model"].load(root)  # warm the scorer cache: every process then hits the catalog at about once
print("READY", flush=True)
while not go.exists():
    time.sleep(0.01)
with dg.DagsterInstance.get() as instance:
    result = dg.materialize([scores], resources=res, instance=instance, partition_key=partition,
                            raise_on_error=False)
print("SUCCESS" if result.success else "FAILED\n" + failure_message(result), flush=True)
"""


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
