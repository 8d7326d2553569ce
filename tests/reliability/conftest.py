"""Helpers of the reliability suite: data roots with hostile tars, Dagster resources, child processes.

Fixtures:

* ``rel_ckpt`` -> ``Path``: the session's ``tiny_checkpoint`` (read-only).
* ``run_child`` -> ``Callable``: starts ``python -c CODE ARGS...`` in the repository with ``PYTHONPATH`` set, in
  its own session (so a kill reaches it and the workers it started), output captured to a log file.

Helpers (plain functions, importable as ``tests.reliability.conftest``): :func:`make_resources`,
:func:`materialize`, :func:`catalog_counts`, :func:`files_under`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rel_ckpt(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def make_resources(
    root: Path, ckpt: Path | None, sources: Sequence[tuple[str, str]], **scoring: Any
) -> dict[str, Any]:
    """Resources for ``root`` with real-data sources ``[(name, kind)]`` (no world) and the checkpoint ``ckpt``."""
    from dagster_duckdb import DuckDBResource

    from unifilter_dagster.resources import ScoringModelResource, SourceConfig, UniFilterHome

    opts = {"device": "cpu", "num_workers": 0, "batch_size": 4, **scoring}
    return {
        "home": UniFilterHome(
            root=str(root),
            use_world=False,
            sources=[SourceConfig(name=n, kind=k) for n, k in sources],
        ),
        "duckdb": DuckDBResource(database=str(root / "unifilter.duckdb")),
        "scoring_model": ScoringModelResource(checkpoint=str(ckpt) if ckpt else None, **opts),
    }


def materialize(assets: list[Any], resources: dict[str, Any], instance: Any, partition: str | None = None):
    """``dg.materialize`` without raising; returns the result (check ``.success``)."""
    import dagster as dg

    return dg.materialize(
        assets, resources=resources, instance=instance, partition_key=partition, raise_on_error=False
    )


def failure_message(result: Any) -> str:
    """The error text of the failed step(s) of a materialize result."""
    texts = []
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            while err is not None:
                texts.append(err.message)
                err = err.cause
    return "\n".join(texts)


def catalog_counts(db: Path) -> dict[str, Any]:
    """Integrity figures of a catalog: rows per table, duplicates, orphans."""
    import duckdb

    conn = duckdb.connect(str(db), read_only=True)
    try:

        def one(sql: str) -> Any:
            return conn.execute(sql).fetchone()[0]

        return {
            "tars": one("SELECT count(*) FROM tars"),
            "score_stats": one("SELECT count(*) FROM score_stats"),
            "lineage": one("SELECT count(*) FROM lineage"),
            "dup_tars": one("SELECT count(*) - count(DISTINCT partition_key) FROM tars"),
            "dup_stats": one("SELECT count(*) - count(DISTINCT partition_key) FROM score_stats"),
            "dup_lineage": one(
                "SELECT count(*) FROM (SELECT asset_key, partition_key FROM lineage GROUP BY ALL "
                "HAVING count(*) > 1)"
            ),
            "orphan_stats": one("SELECT count(*) FROM score_stats s ANTI JOIN tars t USING (partition_key)"),
            "orphan_lineage": one(
                "SELECT count(*) FROM lineage l WHERE l.partition_key IS NOT NULL "
                "AND l.partition_key NOT IN (SELECT partition_key FROM tars)"
            ),
        }
    finally:
        conn.close()


def files_under(folder: Path) -> dict[str, int]:
    """Every regular file under ``folder`` (relative path -> size), symlinks included as entries."""
    out: dict[str, int] = {}
    for path in folder.rglob("*"):
        if path.is_symlink() or path.is_file():
            out[str(path.relative_to(folder))] = path.lstat().st_size
    return out


class Child:
    """A child Python process in its own session, output in ``log``."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc, self.log = proc, log

    def kill(self) -> None:
        """SIGKILL the child's whole process group (the child and any worker it started)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        """Poll ``predicate`` until true; fails with the child's output if it ends or time runs out."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"child ended ({self.proc.returncode}) before the condition:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"condition not reached in {timeout}s:\n{self.output()}")
            time.sleep(0.02)


@pytest.fixture
def run_child(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(code: str, *args: str, env: dict[str, str] | None = None) -> Child:
        log = tmp_path / f"child{len(children)}.log"
        handle = open(log, "wb")  # noqa: SIM115 - the child owns it; closed after the Popen call
        full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            cwd=REPO,
            env=full_env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        child = Child(proc, log)
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
