"""The Dagster UI in a real browser: ``dagster dev`` on the tiny trained world, one partition launched from the UI.

Screenshots (test-artifacts/): dagster-asset-graph.png, dagster-launch-partition.png, dagster-run-success.png,
dagster-score-histogram.png.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dagster.world import BIN, REPO_ROOT, World, build_template, copy_world

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PARTITION = "datacomp_0001"
SERVER_WAIT_S = 90
RUN_WAIT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop dagster dev's process group (webserver, daemon, code servers): SIGTERM, then SIGKILL what is left.

    ``dagster dev`` may linger after SIGTERM while its children shut down, so the group is always killed.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ui_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A copy of the Dagster tests' tiny trained world (classifier trained, 3 partitions registered)."""
    template = build_template(tmp_path_factory.getbasetemp() / "unifilter-dagster-template")
    return copy_world(template, tmp_path_factory.mktemp("dagster-ui"))


@pytest.fixture(scope="module")
def dagster_dev(ui_world: World) -> Iterator[str]:
    """``dagster dev`` on 127.0.0.1 in its own process group; yields the base URL."""
    port = _free_port()
    log = open(ui_world.home / "dagster-dev.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-m", "unifilter_dagster", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO_ROOT,
        env=ui_world.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_WAIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited: {(ui_world.home / 'dagster-dev.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not answer in {SERVER_WAIT_S}s")
            time.sleep(1)
        yield url
    finally:
        _stop_group(proc)
        log.close()


def _dismiss_community_modal(page: Any) -> None:
    """The first visit shows a 'Join the Dagster community' dialog; skip it when it appears."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=4000)
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError: no modal this time
        return
    skip.click()


def _wait_for_run(world: World, partition: str) -> Any:
    """The first finished run of ``partition``, read from the instance ``dagster dev`` serves."""
    deadline = time.monotonic() + RUN_WAIT_S
    with world.instance() as instance:
        while True:
            runs = [r for r in instance.get_runs() if r.tags.get("dagster/partition") == partition]
            if runs and runs[0].is_finished:
                return runs[0]
            assert time.monotonic() < deadline, f"no finished run of {partition}: {[r.status for r in runs]}"
            time.sleep(1)


def test_materialize_one_partition_from_the_ui(
    page: Any, dagster_dev: str, ui_world: World, artifacts_dir: Path
) -> None:
    import dagster as dg

    page.set_default_timeout(30_000)
    # 1. the asset graph, every group expanded
    page.goto(f"{dagster_dev}/asset-groups", wait_until="domcontentloaded")
    _dismiss_community_modal(page)
    page.get_by_text("tars", exact=True).first.wait_for()
    page.locator('[aria-label="settings"]').last.click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    for asset in ("stage2_classifier", "scores", "filtered_dataset"):
        page.get_by_text(asset, exact=True).first.wait_for()
    page.wait_for_load_state("networkidle")  # the nodes' materialization status
    page.screenshot(path=str(artifacts_dir / "dagster-asset-graph.png"))

    # 2. the scores asset: Materialize -> one partition -> Launch
    page.goto(f"{dagster_dev}/assets/scores", wait_until="domcontentloaded")
    _dismiss_community_modal(page)
    page.get_by_role("button", name="Materialize…").first.click()
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize scores")
    dialog.get_by_text("Select a partition or create one").click()
    page.get_by_role("menuitem").filter(has_text=PARTITION).first.click()  # its name repeats the key
    page.keyboard.press("Escape")
    page.get_by_placeholder("Filter partitions").wait_for(state="hidden")  # the picker has faded out
    launch = dialog.get_by_role("button", name="Launch 1 run")
    launch.wait_for()
    assert launch.is_enabled()
    assert dialog.get_by_text(PARTITION, exact=True).first.is_visible()
    page.screenshot(path=str(artifacts_dir / "dagster-launch-partition.png"))
    launch.click()

    # 3. the run (dequeued by dagster dev's daemon) succeeds; its page says so
    run = _wait_for_run(ui_world, PARTITION)
    assert run.status == dg.DagsterRunStatus.SUCCESS, (ui_world.home / "dagster-dev.log").read_text()[-3000:]
    page.goto(f"{dagster_dev}/runs/{run.run_id}", wait_until="domcontentloaded")
    page.get_by_text("Success", exact=True).first.wait_for()
    page.get_by_text(f"partition: {PARTITION}").first.wait_for()
    page.screenshot(path=str(artifacts_dir / "dagster-run-success.png"))
    assert (ui_world.root / "scores" / "datacomp" / "00000001.parquet").is_file()
    assert ui_world.catalog().score_stats(PARTITION) is not None

    # 4. the score histogram of that tar, rendered from the materialization's markdown metadata
    page.goto(f"{dagster_dev}/assets/scores", wait_until="domcontentloaded")
    row = page.get_by_role("row").filter(has_text="score_histogram").first
    row.scroll_into_view_if_needed()
    row.get_by_text("[Show Markdown]").click()
    image = page.locator('img[src^="data:image/png"]').first
    image.wait_for()
    assert image.evaluate("img => img.naturalWidth") > 100
    page.screenshot(path=str(artifacts_dir / "dagster-score-histogram.png"))
