"""The shell flow of the issue through the real CLI: manifest, one partition, then a backfill of all of them.

``dagster job backfill`` only submits runs; the repository's dagster.yaml queues them (QueuedRunCoordinator with
tag concurrency), so ``dagster-daemon run`` dequeues and launches them. The daemon runs in its own process group,
stopped at the end of the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.dagster.world import BIN, REPO_ROOT, TEMPLATE_PARTITIONS, World, run_cli

ALL = sorted([*TEMPLATE_PARTITIONS, "obelics_0042"])


def score_stats_keys(world: World) -> list[str]:
    return [r[0] for r in world.catalog().query("SELECT partition_key FROM score_stats ORDER BY 1")[1]]


@pytest.fixture
def daemon(world: World) -> Iterator[Any]:
    """Starts ``dagster-daemon run`` lazily (call the fixture's value) in its own process group."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        log = open(world.home / "daemon.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-m", "unifilter_dagster"],
            cwd=REPO_ROOT,
            env=world.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_manifest_partition_and_backfill_from_the_shell(world: World, daemon: Any) -> None:
    world.add_tar_42()
    manifest = run_cli(
        ["dagster", "asset", "materialize", "-m", "unifilter_dagster", "--select", "tar_manifest"], world
    )
    assert manifest.returncode == 0, manifest.stderr[-3000:]
    with world.instance() as instance:
        assert sorted(instance.get_dynamic_partitions("tars")) == ALL

    one = run_cli(
        ["dagster", "asset", "materialize", "-m", "unifilter_dagster"]
        + ["--select", "scores", "--partition", "obelics_0042"],
        world,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert (world.root / "scores" / "obelics" / "00000042.parquet").is_file()
    assert score_stats_keys(world) == ["obelics_0042"]

    backfill = run_cli(
        ["dagster", "job", "backfill", "-m", "unifilter_dagster", "-j", "score_tars", "--all", "--noprompt"],
        world,
    )
    assert backfill.returncode == 0, backfill.stderr[-3000:]
    match = re.search(r"Launched backfill job `(\w+)`", backfill.stdout + backfill.stderr)
    assert match, backfill.stdout
    backfill_id = match.group(1)

    daemon()
    deadline = time.monotonic() + 180
    with world.instance() as instance:
        while True:
            runs = [r for r in instance.get_runs() if r.tags.get("dagster/backfill") == backfill_id]
            states = {r.tags["dagster/partition"]: r.status.value for r in runs}
            if len(states) == len(ALL) and all(
                s in ("SUCCESS", "FAILURE", "CANCELED") for s in states.values()
            ):
                break
            assert time.monotonic() < deadline, f"backfill runs not finished: {states}"
            time.sleep(2)
        assert states == dict.fromkeys(ALL, "SUCCESS"), (world.home / "daemon.log").read_text()[-3000:]
        run_ids = {r.tags["dagster/partition"]: r.run_id for r in runs}

    for key in ALL:
        source, number = key.rsplit("_", 1)
        assert (world.root / "scores" / source / f"{int(number):08d}.parquet").is_file(), key
    assert score_stats_keys(world) == ALL
    lineage = dict(
        world.catalog().query("SELECT partition_key, run_id FROM lineage WHERE asset_key = 'scores'")[1]
    )
    assert lineage == run_ids  # the backfill's runs replaced the earlier rows
