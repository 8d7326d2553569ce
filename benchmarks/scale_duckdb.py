"""Threshold analysis at scale: DuckDB over synthetic score parquet (default 100M rows), wall time + peak memory.

Generates ``benchmarks/results/scale_duckdb/scores.parquet`` with DuckDB itself (columns like the score table:
source, partition_key, score float32, status, n_tokens) unless it already exists with the requested row count,
then times what threshold selection needs: exact and approximate score quantiles per source, a per-source
histogram, and the kept fraction at a few thresholds. Peak RSS of this process (DuckDB runs in-process) is read
after each query.

    python benchmarks/scale_duckdb.py                 # 100M rows (~1 GB of parquet)
    python benchmarks/scale_duckdb.py --rows 10_000_000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import duckdb

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUERIES = {
    "quantiles_exact_per_source": """
        SELECT source, count(*) AS n,
               quantile_cont(score, [0.1, 0.25, 0.5, 0.75, 0.9]) AS q
        FROM scores WHERE status = 'ok' GROUP BY source ORDER BY source""",
    "quantiles_approx_per_source": """
        SELECT source, approx_quantile(score, [0.1, 0.25, 0.5, 0.75, 0.9]) AS q
        FROM scores WHERE status = 'ok' GROUP BY source ORDER BY source""",
    "histogram_per_source": """
        SELECT source, least(greatest(floor(score * 10), -10), 40) / 10 AS bucket, count(*) AS n
        FROM scores WHERE status = 'ok' GROUP BY ALL ORDER BY ALL""",
    "kept_fraction_at_thresholds": """
        SELECT source, avg((score >= 1.0)::INT) AS keep_1_0, avg((score >= 1.5)::INT) AS keep_1_5,
               avg((score >= 2.0)::INT) AS keep_2_0, avg((score >= 2.5)::INT) AS keep_2_5
        FROM scores WHERE status = 'ok' GROUP BY source ORDER BY source""",
    "status_counts_per_partition": """
        SELECT count(*) FROM (SELECT partition_key, status, count(*) FROM scores GROUP BY ALL)""",
}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(conn: duckdb.DuckDBPyConnection, path: Path, rows: int, sources: int, per_tar: int) -> float:
    """Write ``rows`` synthetic score rows to ``path`` with DuckDB; returns seconds."""
    start = time.perf_counter()
    tmp = path.with_suffix(".tmp.parquet")
    conn.execute("SELECT setseed(0.42)")
    conn.execute(
        f"""
        COPY (
            SELECT 'source_' || (i % {sources}) AS source,
                   lpad(CAST(i // {per_tar} AS VARCHAR), 8, '0') AS partition_key,
                   CAST(1.5 + 0.6 * sqrt(-2 * ln(random() + 1e-12)) * cos(6.283185 * random())
                        + (i % {sources}) * 0.05 AS FLOAT) AS score,
                   CASE WHEN i % 211 = 0 THEN 'error' WHEN i % 97 = 0 THEN 'skipped' ELSE 'ok' END AS status,
                   CAST(150 + (i % 60) AS INTEGER) AS n_tokens
            FROM range({rows}) t(i)
        ) TO '{tmp}' (FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE 1000000)"""
    )
    tmp.replace(path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=lambda s: int(s.replace("_", "")), default=100_000_000)
    parser.add_argument("--sources", type=int, default=8)
    parser.add_argument("--rows-per-tar", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    parser.add_argument("--memory-limit", default=None, help="DuckDB memory_limit, e.g. 2GB")
    parser.add_argument("--workdir", type=Path, default=RESULTS_DIR / "scale_duckdb")
    parser.add_argument("--keep", action="store_true", help="keep the generated parquet (default: delete it)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "scale_duckdb.json")
    args = parser.parse_args(argv)

    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / f"scores_{args.rows}.parquet"
    conn = duckdb.connect()
    if args.threads:
        conn.execute(f"SET threads = {int(args.threads)}")
    if args.memory_limit:
        conn.execute(f"SET memory_limit = '{args.memory_limit}'")
    result: dict = {"rows": args.rows, "duckdb": duckdb.__version__}
    result["threads"] = conn.execute("SELECT current_setting('threads')").fetchone()[0]
    result["memory_limit"] = conn.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    if not data.exists():
        print(f"generating {args.rows:,} rows -> {data}", flush=True)
        result["generate_s"] = round(generate(conn, data, args.rows, args.sources, args.rows_per_tar), 2)
    result["parquet_bytes"] = data.stat().st_size
    result["peak_rss_mib_after_generate"] = round(peak_rss_mib(), 1)
    conn.execute(f"CREATE VIEW scores AS SELECT * FROM read_parquet('{data}')")
    result["queries"] = {}
    for name, sql in QUERIES.items():
        start = time.perf_counter()
        rows = conn.execute(sql).fetchall()
        seconds = time.perf_counter() - start
        result["queries"][name] = {
            "seconds": round(seconds, 3),
            "rows_per_s": round(args.rows / seconds),
            "result_rows": len(rows),
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
        print(
            f"{name}: {seconds:.2f} s ({args.rows / seconds / 1e6:.0f}M rows/s), peak RSS {peak_rss_mib():.0f} MiB",
            flush=True,
        )
        if name == "quantiles_exact_per_source":
            result["example_quantiles"] = {r[0]: [round(x, 3) for x in r[2]] for r in rows[:3]}
    conn.close()
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
