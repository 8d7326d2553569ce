"""Crash tests' pause points inside catalog write transactions, injected from the test side.

A child process started by a crash test imports this module first. When ``$UNIFILTER_TEST_CATALOG_PAUSE`` is
``<stage>:<marker file>``, :func:`install` wraps ``duckdb.connect`` so that the connection pauses (creates the
marker, then sleeps until the test SIGKILLs the process) at the statement that marks ``<stage>``. Production code
carries no hook: the stages are named by the SQL the catalog runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import duckdb

PAUSE_ENV = "UNIFILTER_TEST_CATALOG_PAUSE"

#: stage -> (pause before or after the statement, the statement's start)
STAGES: dict[str, tuple[str, str]] = {
    "register_tars_mid": ("after", "INSERT INTO tars"),  # rows written, transaction still open
    "lineage_mid": ("before", "INSERT INTO lineage VALUES"),  # the old row deleted, the new one not written
    "score_stats_mid": ("before", "INSERT INTO score_stats"),  # likewise
    "before_commit": ("before", "COMMIT"),
}


def _pause(marker: str) -> None:
    Path(marker).write_text(str(os.getpid()))
    while True:  # the test kills this process
        time.sleep(1)


class _PausingConnection:
    """A DuckDB connection that pauses at one statement; everything else goes to the real one."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, when: str, prefix: str, marker: str) -> None:
        self._conn, self._when, self._prefix, self._marker = conn, when, prefix, marker

    def _run(self, method: str, sql: str, *args: Any, **kwargs: Any) -> Any:
        hit = " ".join(str(sql).split()).upper().startswith(self._prefix.upper())
        if hit and self._when == "before":
            _pause(self._marker)
        result = getattr(self._conn, method)(sql, *args, **kwargs)
        if hit:
            _pause(self._marker)
        return result

    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        return self._run("execute", sql, *args, **kwargs)

    def executemany(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        return self._run("executemany", sql, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def __enter__(self) -> _PausingConnection:
        self._conn.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._conn.__exit__(*exc)


def install(spec: str | None = None) -> bool:
    """Wrap ``duckdb.connect`` per ``spec`` (default: the environment variable); False when there is none."""
    spec = spec if spec is not None else os.environ.get(PAUSE_ENV)
    if not spec:
        return False
    stage, _, marker = spec.partition(":")
    if stage not in STAGES:
        raise ValueError(f"unknown catalog pause stage {stage!r}; known: {sorted(STAGES)}")
    when, prefix = STAGES[stage]
    real_connect = duckdb.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        conn = real_connect(*args, **kwargs)
        if kwargs.get("read_only"):
            return conn
        return _PausingConnection(conn, when, prefix, marker)

    duckdb.connect = connect
    return True


install()
