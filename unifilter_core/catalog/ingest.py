"""Catalog refresh: the statistics of every score table not ingested yet (or rescored since), in batches.

Scoring, wherever it runs, writes only to the data root (tables and manifests, each manifest with the table's
statistics); the catalog file stays on one host and ingests what is new here, a batch per transaction, so a
from-scratch refresh of 100k tables is minutes, not hours.
"""

from __future__ import annotations

import logging
from typing import Any

import duckdb

from unifilter_core import storage
from unifilter_core.catalog.stats import table_stats

logger = logging.getLogger(__name__)

#: statistics written per catalog transaction
BATCH = 5_000


def refresh_stats(catalog: Any, good: list[str]) -> tuple[int, list[str]]:
    """Ingest the statistics of the tables ``good`` that the catalog lacks, holds from an older table, or holds
    without fine histogram (written by an older version). Returns (tables ingested, ``"path: why"`` of those
    that do not read)."""
    have = dict(
        catalog._read(
            lambda conn: conn.execute(
                "SELECT score_path, epoch(updated_at) FROM score_stats WHERE fine_bins IS NOT NULL"
            ).fetchall()
        )
    )
    done, unreadable, batch = 0, [], []
    for p in map(storage.location, good):
        rp = str(p) if storage.is_url(p) else str(p.resolve())
        try:
            if rp in have and have[rp] >= p.stat().st_mtime:
                continue
            stats = table_stats(p)
        except (duckdb.Error, OSError, ValueError) as exc:  # data pages corrupt behind a good footer
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("score table %s does not read, left out of score_stats: %s", p, why)
            unreadable.append(f"{p}: {why}")
            continue
        if stats is not None:
            batch.append(stats)
        if len(batch) >= BATCH:
            done += catalog.ingest_stats(batch)
            batch = []
    done += catalog.ingest_stats(batch)
    return done, unreadable


def record_drift(catalog: Any, rows: list[Any], model_fingerprint: str | None) -> int:
    """Replace the ``score_drift`` rows of these tars (:class:`unifilter_core.drift.DriftRow`) in one write."""
    if not rows:
        return 0
    import pyarrow as pa

    from unifilter_core.catalog.schema import utcnow

    table = pa.Table.from_pylist(
        [{**r.to_dict(), "model_fingerprint": model_fingerprint, "computed_at": utcnow()} for r in rows]
    )

    def work(conn: duckdb.DuckDBPyConnection) -> None:  # set-based: a statement per row costs ~5 ms
        conn.register("_new_drift", table)
        try:
            conn.execute(
                "DELETE FROM score_drift WHERE partition_key IN (SELECT partition_key FROM _new_drift)"
            )
            conn.execute("INSERT INTO score_drift BY NAME SELECT * FROM _new_drift")
        finally:
            conn.unregister("_new_drift")

    catalog._write(work)
    return len(rows)
