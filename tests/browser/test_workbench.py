"""The threshold workbench in a real browser: open from file://, move the threshold, see the kept count change.

Screenshots: test-artifacts/workbench-default.png, workbench-threshold-moved.png, workbench-keep-50.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_report import build_report_root
from unifilter_core.report import WorkbenchConfig, write_workbench

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def workbench_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("workbench_browser")
    summary = write_workbench(build_report_root(root), WorkbenchConfig(samples_per_band=3))
    return summary.path.resolve().as_uri()


def _open(page: Any, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)


def test_threshold_moves_kept_count(page: Any, workbench_url: str, artifacts_dir: Path) -> None:
    _open(page, workbench_url)
    kept = page.get_by_test_id("kept-count-datacomp")
    assert kept.inner_text() == "3"  # keep 0.3 of 10 ok scores
    assert page.get_by_test_id("kept-share-datacomp").inner_text() == "30.0%"
    assert page.get_by_test_id("band-lowest-datacomp").locator("img").count() == 3
    assert page.get_by_test_id("band-middle-datacomp").get_by_test_id("sample-card").count() == 3
    page.screenshot(path=str(artifacts_dir / "workbench-default.png"), full_page=True)

    page.get_by_test_id("threshold-input-datacomp").fill("1.0")
    assert kept.inner_text() == "6"  # 1.1 1.3 1.7 2.1 2.5 2.9
    assert page.get_by_test_id("summary-kept-datacomp").inner_text() == "6"
    assert '"threshold": 1' in page.get_by_test_id("selection").inner_text()

    page.get_by_test_id("threshold-range-datacomp").focus()
    page.keyboard.press("Home")  # the slider to its minimum: everything is kept
    assert kept.inner_text() == "10"
    assert page.get_by_test_id("threshold-input-datacomp").input_value() == "0.1000"
    page.screenshot(path=str(artifacts_dir / "workbench-threshold-moved.png"), full_page=True)

    page.get_by_test_id("keep-input-datacomp").fill("50")
    page.get_by_test_id("keep-input-datacomp").press("Enter")
    assert kept.inner_text() == "5"
    page.get_by_test_id("reset-datacomp").click()
    assert kept.inner_text() == "3"
    page.get_by_test_id("keep-input-datacomp").fill("50")
    page.get_by_test_id("keep-input-datacomp").press("Enter")
    page.screenshot(path=str(artifacts_dir / "workbench-keep-50.png"), full_page=True)
    assert page.errors == [] and page.external_requests == []


def test_sources_without_scores_and_hostile_text(page: Any, workbench_url: str) -> None:
    _open(page, workbench_url)
    assert page.get_by_test_id("no-scores-broken").is_visible()
    assert page.get_by_test_id("no-scores-pending").is_visible()
    assert page.get_by_test_id("kept-count-obelics").inner_text() == "2"  # keep 0.3 of 4 -> k = 2
    highest = page.get_by_test_id("band-highest-datacomp")
    assert "</script><script>alert(1)</script>" in highest.inner_text()  # shown as text, never run
    assert highest.locator("b").count() == 0
    assert page.errors == [] and page.external_requests == []
