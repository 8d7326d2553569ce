"""Four partitions materialized at once by four processes into one DuckDB catalog: nothing lost, nothing doubled."""

from __future__ import annotations

import subprocess
from typing import Any

import dagster as dg
import pytest

from tests.dagster.world import BIN, REPO_ROOT, TEMPLATE_PARTITIONS, World
from unifilter_dagster.definitions import ALL_ASSETS

KEYS = sorted([*TEMPLATE_PARTITIONS, "obelics_0042"])


@pytest.mark.slow
def test_four_partitions_in_parallel_processes(world: World, instance: Any) -> None:
    world.add_tar_42()
    assert dg.materialize(
        ALL_ASSETS, selection=["tar_manifest"], resources=world.resources(), instance=instance
    ).success
    assert sorted(instance.get_dynamic_partitions("tars")) == KEYS

    procs = [
        subprocess.Popen(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "unifilter_dagster"]
            + ["--select", "scores", "--partition", key],
            cwd=REPO_ROOT,
            env=world.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for key in KEYS
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for key, proc, out in zip(KEYS, procs, outputs, strict=True):
        assert proc.returncode == 0, f"{key}:\n{out[-3000:]}"

    catalog = world.catalog()
    stats = catalog.query("SELECT partition_key, count(*) FROM score_stats GROUP BY 1 ORDER BY 1")[1]
    assert stats == [(k, 1) for k in KEYS]
    lineage = catalog.query(
        "SELECT partition_key, count(*), any_value(status) FROM lineage WHERE asset_key = 'scores' GROUP BY 1 ORDER BY 1"
    )[1]
    assert lineage == [(k, 1, "success") for k in KEYS]
    history = catalog.query("SELECT count(*) FROM lineage_history WHERE asset_key = 'scores'")[1]
    assert history == [(4,)]
    runs = {
        r.tags.get("dagster/partition"): r.status
        for r in instance.get_runs()
        if r.tags.get("dagster/partition")
    }
    assert runs == dict.fromkeys(KEYS, dg.DagsterRunStatus.SUCCESS)
    rows = catalog.query("SELECT count(*) FROM scores")[1][0][0]
    assert rows == sum(catalog.score_stats(k)["n_rows"] for k in KEYS)
