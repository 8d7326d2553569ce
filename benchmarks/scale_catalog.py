"""Catalog write cost per partition with many partitions registered.

Registers ``--partitions`` tars (default 10k) in a fresh catalog, pre-fills ``lineage`` / ``lineage_history``
with one row per partition (bulk SQL, as after a full backfill), then times what every scored partition does:
``Catalog.record_score_stats`` (stats of a real score parquet + view upkeep) and ``Catalog.record_lineage``, for
``--measure`` partitions. Reports mean/p50/p95 per call, for the first and the last tenth of the measured calls
(growth), and the catalog file size.

    python benchmarks/scale_catalog.py                   # 10k partitions registered, 300 measured
    python benchmarks/scale_catalog.py --partitions 1000 --measure 50
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unifilter_core.catalog import Catalog, TarRecord  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_score_table(path: Path, partition_key: str, rows: int, seed: int) -> None:
    """A small score parquet with the score-table columns."""
    rng = np.random.default_rng(seed)
    status = np.where(rng.random(rows) < 0.02, "error", "ok")
    table = pa.table(
        {
            "key": [f"{partition_key}_{i:05d}" for i in range(rows)],
            "source": ["bench"] * rows,
            "partition_key": [partition_key] * rows,
            "uid": [f"u{i}" for i in range(rows)],
            "url": [None] * rows,
            "score": pa.array(rng.normal(1.5, 0.6, rows).astype(np.float32)),
            "status": status.tolist(),
            "reason": [None if s == "ok" else "image_decode" for s in status],
            "n_images": pa.array(np.ones(rows, dtype=np.int32)),
            "n_tokens": pa.array(rng.integers(150, 210, rows).astype(np.int32)),
            "truncated": [False] * rows,
            "model_fingerprint": ["f" * 64] * rows,
            "detail": [None] * rows,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def summary(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    return {
        "mean_ms": round(statistics.fmean(ms), 2),
        "p50_ms": round(ms[len(ms) // 2], 2),
        "p95_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 2),
    }


def prefill_lineage(catalog: Catalog, keys: list[str]) -> float:
    """One lineage + lineage_history row per partition, in bulk (what a finished backfill leaves)."""
    import duckdb

    start = time.perf_counter()
    conn = duckdb.connect(str(catalog.path))
    try:
        conn.execute("CREATE TEMP TABLE k(partition_key VARCHAR)")
        conn.executemany("INSERT INTO k VALUES (?)", [[k] for k in keys])
        for table in ("lineage", "lineage_history"):
            conn.execute(
                f"""INSERT INTO {table} SELECT 'score_table', partition_key, 'prefill-run', 'v1', 'f', 'i', 10000,
                    now()::TIMESTAMP, now()::TIMESTAMP, 'success', now()::TIMESTAMP FROM k"""
            )
    finally:
        conn.close()
    return time.perf_counter() - start


def register_rowwise(path: Path, keys: list[str]) -> float:
    """The same upsert of ``keys`` as one row-at-a-time ``executemany`` (how ``register_tars`` used to write),
    into a scratch catalog: the baseline of ``register_speedup``."""
    import duckdb

    Catalog(path, root=path.parent / "rowwise_root")  # creates the schema
    now = datetime.now()
    params = [
        [k, "bench", "caption", f"/data/bench/{i:08d}.tar", 1, None, None, now, now]
        for i, k in enumerate(keys)
    ]
    with duckdb.connect(str(path)) as conn:
        start = time.perf_counter()
        conn.execute("BEGIN")
        conn.executemany(
            """INSERT INTO tars VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (partition_key) DO UPDATE SET
            source = excluded.source, kind = excluded.kind, path = excluded.path, size_bytes = excluded.size_bytes,
            mtime = excluded.mtime, fingerprint = excluded.fingerprint, updated_at = excluded.updated_at""",
            params,
        )
        conn.execute("COMMIT")
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=10_000)
    parser.add_argument("--measure", type=int, default=300)
    parser.add_argument("--rows-per-table", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scale_catalog.json")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="scale_catalog_"))
    try:
        catalog = Catalog(root / "unifilter.duckdb", root=root)
        keys = [f"bench/{i:08d}" for i in range(args.partitions)]
        start = time.perf_counter()
        catalog.register_tars(
            TarRecord(
                partition_key=k, source="bench", path=f"/data/bench/{i:08d}.tar", kind="caption", size_bytes=1
            )
            for i, k in enumerate(keys)
        )
        register_s = time.perf_counter() - start
        rowwise_s = register_rowwise(root / "rowwise.duckdb", keys)
        result: dict = {
            "partitions": args.partitions,
            "register_tars_s": round(register_s, 2),
            "register_rowwise_executemany_s": round(rowwise_s, 2),
            "register_speedup": round(rowwise_s / register_s, 1),
        }
        result["prefill_lineage_s"] = round(prefill_lineage(catalog, keys), 2)
        stats_t, lineage_t = [], []
        for i, key in enumerate(keys[: args.measure]):
            table = root / "scores" / "bench" / f"{i:08d}.parquet"
            write_score_table(table, key, args.rows_per_table, seed=i)
            start = time.perf_counter()
            catalog.record_score_stats(key, table)
            stats_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            catalog.record_lineage(
                "score_table", key, f"run-{i}", status="success", row_count=args.rows_per_table
            )
            lineage_t.append(time.perf_counter() - start)
        tenth = max(1, len(stats_t) // 10)
        result["record_score_stats"] = {
            **summary(stats_t),
            "first_tenth": summary(stats_t[:tenth]),
            "last_tenth": summary(stats_t[-tenth:]),
        }
        result["record_lineage"] = {
            **summary(lineage_t),
            "first_tenth": summary(lineage_t[:tenth]),
            "last_tenth": summary(lineage_t[-tenth:]),
        }
        per = statistics.fmean(s + t for s, t in zip(stats_t, lineage_t, strict=True))
        result["per_partition_write_ms"] = round(per * 1000, 2)
        result["partitions_per_s_single_writer"] = round(1 / per, 1)
        result["catalog_bytes"] = catalog.path.stat().st_size
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
