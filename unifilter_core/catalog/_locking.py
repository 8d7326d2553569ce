"""Safe access to a DuckDB file shared by many processes.

DuckDB lets one process at a time open a database file for writing (and no reader may hold it meanwhile).
Several Dagster runs finish at once, so every catalog write goes through :func:`write_connection`:

- an exclusive ``fcntl.flock`` on ``<db>.lock`` serialises writers (and readers take it shared), so processes
  that use this module queue politely instead of failing on DuckDB's own file lock;
- connections are short-lived: opened for one transaction and closed at once;
- DuckDB lock/IO errors (another tool holding the file, a lock race) are retried with jittered backoff;
- the work runs in one transaction: a writer killed part-way leaves the old rows, a finished one the new rows.

The kernel drops a ``flock`` when its process dies, so a SIGKILLed writer never leaves the catalog locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import duckdb

logger = logging.getLogger(__name__)

T = TypeVar("T")


class CatalogBusyError(TimeoutError):
    """The catalog stayed locked by another process for longer than the configured timeout."""


def lock_path(db_path: Path) -> Path:
    """The lock file next to the database: ``<db>.lock``."""
    return db_path.with_name(db_path.name + ".lock")


def _is_transient(exc: BaseException) -> bool:
    """True for DuckDB errors that another process holding the file (or a lock race) explains."""
    if isinstance(exc, duckdb.ConnectionException):
        return True  # same file open in this process with another configuration
    if isinstance(exc, duckdb.TransactionException):
        return "conflict" in str(exc).lower()
    if isinstance(exc, duckdb.IOException):
        msg = str(exc).lower()
        return "lock" in msg or "resource temporarily unavailable" in msg
    return False


@contextlib.contextmanager
def file_lock(path: Path, *, exclusive: bool, timeout: float) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created if needed) for the ``with`` block.

    Plain ``fcntl.flock`` rather than ``filelock`` (used for every other lock of the project): readers share this
    lock (``LOCK_SH``) while a writer holds it alone, and ``filelock.FileLock`` (``filelock>=3.12``, the declared
    dependency) has exclusive locks only.

    Args:
        path: the lock file.
        exclusive: exclusive (writer) or shared (reader) lock.
        timeout: seconds to wait before raising :class:`CatalogBusyError`.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CatalogBusyError(
                        f"catalog lock {path} held by another process for more than {timeout:.0f}s; "
                        "retry later or raise lock_timeout"
                    ) from None
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _retrying(op: Callable[[], T], *, what: str, timeout: float) -> T:
    """Run ``op`` until it succeeds, retrying transient DuckDB errors with jittered backoff until ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    attempt = 0
    while True:
        attempt += 1
        try:
            return op()
        except duckdb.Error as exc:
            if not _is_transient(exc) or time.monotonic() >= deadline:
                if _is_transient(exc):
                    raise CatalogBusyError(f"{what}: catalog busy after {attempt} attempts: {exc}") from exc
                raise
            logger.debug("%s: transient DuckDB error (attempt %d), retrying: %s", what, attempt, exc)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


def run_write(
    db_path: Path,
    work: Callable[[duckdb.DuckDBPyConnection], T],
    *,
    timeout: float,
    setup: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> T:
    """Run ``work(conn)`` in one write transaction under the exclusive catalog lock.

    The whole transaction is retried on transient DuckDB errors (it was rolled back, so a retry is safe).

    Args:
        db_path: the DuckDB file.
        work: does the statements; must not commit or open other catalog connections.
        timeout: seconds to wait for the lock and for DuckDB's file lock together.
        setup: called on the new connection first (e.g. to register the store the score tables live on).
    """

    def attempt() -> T:
        conn = duckdb.connect(str(db_path))
        try:
            if setup is not None:
                setup(conn)
            conn.execute("BEGIN TRANSACTION")
            try:
                result = work(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    conn.execute("ROLLBACK")
                raise
            return result
        finally:
            conn.close()

    with file_lock(lock_path(db_path), exclusive=True, timeout=timeout):
        return _retrying(attempt, what=f"write {db_path.name}", timeout=timeout)


def run_read(
    db_path: Path,
    work: Callable[[duckdb.DuckDBPyConnection], T],
    *,
    timeout: float,
    setup: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
) -> T:
    """Run ``work(conn)`` on a short-lived read-only connection under the shared catalog lock (``setup`` as in
    :func:`run_write`)."""

    def attempt() -> T:
        conn = duckdb.connect(str(db_path), read_only=True)
        try:
            if setup is not None:
                setup(conn)
            return work(conn)
        finally:
            conn.close()

    with file_lock(lock_path(db_path), exclusive=False, timeout=timeout):
        return _retrying(attempt, what=f"read {db_path.name}", timeout=timeout)
