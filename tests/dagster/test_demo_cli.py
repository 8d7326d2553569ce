"""``unifilter demo --quick`` from a shell: a quiet run (one line per step, the full log in a file), the last
``demo:`` line, drift rows for every scored partition and the dataset cards."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

pytestmark = pytest.mark.slow


def test_quick_demo_is_quiet_and_leaves_drift_rows_and_cards(tmp_path: Path) -> None:
    root = tmp_path / "home"
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "UNIFILTER_HOME": str(root)}
    code = "import sys; from unifilter_core.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, "demo", "--quick"], env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    shown = (done.stdout + done.stderr).splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(shown) <= 60, "\n".join(shown)
    assert not [line for line in shown if "DEBUG" in line], "\n".join(shown)
    assert shown[-1].startswith("demo: accuracy=")
    (log,) = (root / "logs").glob("demo-*.log")
    assert str(log) in shown[0]
    text = log.read_text()
    assert "stage2" in text and "alembic" in text  # what the terminal no longer shows is in the file
    conn = duckdb.connect(str(root / "unifilter.duckdb"), read_only=True)
    scored = {r[0] for r in conn.execute("SELECT partition_key FROM score_stats").fetchall()}
    drift = dict(conn.execute("SELECT partition_key, flagged FROM score_drift").fetchall())
    assert scored and set(drift) == scored
    for source in ("datacomp", "obelics"):
        assert (root / "filtered" / source / "README.md").is_file()
