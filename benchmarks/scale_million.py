"""A million tars registered in groups of 256: what discovery, the sensor, the schedule, a group run and the
threshold questions cost, each with its wall time and peak memory.

Run from the repository root (CPU; about 15 minutes and ~2 GB of disk at the defaults)::

    python benchmarks/scale_million.py
    python benchmarks/scale_million.py --tars 100000 --tables 20000 --stats 100000   # quicker

The tars are hard links of 16 tiny caption tars (2 samples each; ext4 allows 65,000 links per file), named
``00000000.tar`` .. under one source folder with ``group_size`` 256. Each step runs in a fresh process (its peak
RSS is its own) against a file-backed Dagster instance and DuckDB catalog:

* ``tar_manifest``: discovery of every tar, registration in the catalog and as group partitions;
* ``sensor, all new``: ``new_tars_sensor``'s tick on an empty catalog and instance (every tar new), with the
  size of its reply (serialized run requests and partition requests);
* ``sensor, nothing new``: the next tick;
* ``schedule``: ``stale_scores_schedule``'s tick with nothing scored (every group requested);
* ``group run``: ``scores`` materialized for one group of 256 tars (one model load);
* ``catalog refresh (N tables)``: a from-scratch ``unifilter catalog refresh`` over N score tables with their
  manifests (hard links of a few real tables);
* ``thresholds (N tables)``: ``unifilter thresholds`` over them (auto: statistics past 10,000 tables), and with
  ``--exact-too`` the exact scan beside it;
* ``ingest (M stats)`` and ``thresholds (M tables' statistics)``: M tables' statistics written through
  ``Catalog.ingest_stats`` in batches, then ``unifilter thresholds --method stats``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GROUP = 256
DISTINCT = 16


def _resources(work: Path, root: Path) -> dict[str, Any]:
    from dagster_duckdb import DuckDBResource

    from unifilter_dagster.resources import ScoringModelResource, SourceConfig, UniFilterHome

    source = SourceConfig(name="datacomp", kind="caption", path=str(work / "shards"), group_size=GROUP)
    return {
        "home": UniFilterHome(root=str(root), use_world=False, sources=[source]),
        "duckdb": DuckDBResource(database=str(root / "unifilter.duckdb")),
        "scoring_model": ScoringModelResource(checkpoint=str(work / "ckpt"), device="cpu", num_workers=0),
    }


def _instance(root: Path) -> Any:
    import dagster as dg

    home = root / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


def _reply_mb(result: Any) -> float:
    from dagster._serdes import serialize_value

    requests = list(getattr(result, "run_requests", None) or (result if isinstance(result, list) else []))
    parts = [serialize_value(r) for r in requests]
    parts += [serialize_value(r) for r in getattr(result, "dynamic_partitions_requests", None) or []]
    return sum(len(p) for p in parts) / 2**20


def step(name: str, work: Path) -> dict[str, Any]:
    """One measured step, in this (fresh) process."""
    import dagster as dg

    start = time.perf_counter()
    out: dict[str, Any] = {}
    if name == "tar_manifest":
        from unifilter_dagster.assets.tars import tar_manifest

        root = work / "manifest_root"
        with _instance(root) as instance:
            result = dg.materialize([tar_manifest], resources=_resources(work, root), instance=instance)
            out["partitions"] = len(instance.get_dynamic_partitions("tars"))
        assert result.success
    elif name in ("sensor_new", "sensor_idle", "schedule"):
        from unifilter_dagster.automation import new_tars_sensor, stale_scores_schedule

        root = work / "sensor_root"
        with _instance(root) as instance:
            resources = _resources(work, root)
            if name == "schedule":
                with dg.build_schedule_context(instance=instance, resources=resources) as context:
                    result = stale_scores_schedule(context)
            else:
                with dg.build_sensor_context(instance=instance, resources=resources) as context:
                    result = new_tars_sensor(context)
                for request in getattr(result, "dynamic_partitions_requests", None) or []:
                    instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        out["requests"] = len(
            getattr(result, "run_requests", None) or (result if isinstance(result, list) else [])
        )
        out["reply_mb"] = round(_reply_mb(result), 2)
    elif name == "group_run":
        from unifilter_dagster.assets.tars import scores

        root = work / "manifest_root"
        with _instance(root) as instance:
            result = dg.materialize([scores], resources=_resources(work, root), instance=instance,
                                    partition_key=f"datacomp_0000-{GROUP - 1:04d}")  # fmt: skip
            assert result.success
            out["tars"] = result.asset_materializations_for_node("scores")[0].metadata["tars"].value
    elif name == "ingest_stats":
        out["rows"] = _ingest_synthetic_stats(work / "stats_root", int(os.environ["SCALE_STATS"]))
    else:
        raise SystemExit(f"unknown step {name}")
    out["wall_s"] = round(time.perf_counter() - start, 2)
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def _ingest_synthetic_stats(root: Path, n: int) -> int:
    """``n`` tables' statistics (10 ok scores each, spread over 2 sources) through ``Catalog.ingest_stats``."""
    import numpy as np

    from unifilter_core.catalog import Catalog
    from unifilter_core.catalog.schema import FINE_BINS, FINE_LO, FINE_WIDTH
    from unifilter_core.catalog.stats import ScoreStats

    catalog = Catalog(root=root)
    rng = np.random.default_rng(0)
    for first in range(0, n, 50_000):
        batch = []
        for i in range(first, min(n, first + 50_000)):
            scores = np.sort(rng.uniform(0, 3, 10))
            bins, counts = np.unique(np.clip(((scores - FINE_LO) / FINE_WIDTH).astype(int), 0, FINE_BINS - 1),
                                     return_counts=True)  # fmt: skip
            source = "datacomp" if i % 2 else "obelics"
            batch.append(ScoreStats(
                partition_key=f"{source}_{i:07d}", source=source, score_path=f"/scores/{source}/{i:08d}.parquet",
                n_rows=10, n_ok=10, n_skipped=0, n_error=0, mean=float(scores.mean()), p05=None, p25=None,
                p50=float(np.median(scores)), p75=None, p95=None, min=float(scores[0]), max=float(scores[-1]),
                histogram=[0] * 30, model_fingerprint="m", fine_bins=bins.tolist(), fine_counts=counts.tolist(),
            ))  # fmt: skip
        catalog.ingest_stats(batch)
    return n


def _timed(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """A command's wall time and peak RSS (GNU time's %M)."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "peak_mb": round(peak_kb / 1024), "stdout": done.stdout}


def _run_step(name: str, work: Path, env: dict[str, str]) -> dict[str, Any]:
    res = _timed([sys.executable, __file__, "--step", name, "--work", str(work)], env)
    return {**json.loads(res["stdout"].strip().splitlines()[-1]), "peak_mb": res["peak_mb"]}


def _make_world(work: Path, tars: int, tables: int) -> None:
    from tests.tarfixtures import caption_members, noise_jpeg, write_tar
    from unifilter_core.catalog.stats import compute_score_stats
    from unifilter_core.modeling import init_checkpoint
    from unifilter_core.tokenization import train_bpe_tokenizer

    texts = [f"a photo of thing {i}" for i in range(2 * DISTINCT)]
    seeds = work / "seed_tars"
    for d in range(DISTINCT):
        members = []
        for j in range(2):
            members += caption_members(
                f"{d:04d}{j:05d}", image=noise_jpeg(32, seed=d * 2 + j), text=texts[d * 2 + j]
            )
        write_tar(seeds / f"{d}.tar", members)
    shards = work / "shards"
    shards.mkdir()
    for i in range(tars):
        os.link(seeds / f"{i % DISTINCT}.tar", shards / f"{i:08d}.tar")
    init_checkpoint(
        "tiny", work / "ckpt", tokenizer_dir=train_bpe_tokenizer(texts, work / "tok", vocab_size=300)
    )

    # score tables with manifests: a few real tables (scored shape, random scores), hard-linked N times
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = work / "tables_root" / "scores" / "datacomp"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    seeds_t = []
    for d in range(DISTINCT):
        path = work / "seed_tables" / f"{d}.parquet"
        path.parent.mkdir(exist_ok=True)
        n = 20
        pq.write_table(pa.table({
            "key": [f"{j:09d}" for j in range(n)], "source": ["datacomp"] * n, "partition_key": ["datacomp_x"] * n,
            "score": pa.array(rng.uniform(0, 3, n), pa.float32()), "status": ["ok"] * n, "reason": [None] * n,
            "model_fingerprint": ["m"] * n,
        }), path)  # fmt: skip
        seeds_t.append((path, compute_score_stats("datacomp_x", path).to_manifest()))
    for i in range(tables):
        path, stats = seeds_t[i % DISTINCT]
        os.link(path, folder / f"{i:08d}.parquet")
        doc = {"partition_key": f"datacomp_{i:04d}", "source": "datacomp", "stats": stats}
        (folder / f"{i:08d}.manifest.json").write_text(json.dumps(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=1_000_000)
    parser.add_argument("--tables", type=int, default=100_000, help="score tables for refresh and thresholds")
    parser.add_argument("--stats", type=int, default=1_000_000, help="tables' statistics for thresholds")
    parser.add_argument("--exact-too", action="store_true", help="also time the exact threshold scan")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(args.step, Path(args.work))))
        return

    work = Path(tempfile.mkdtemp(prefix="unifilter-million-"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "SCALE_STATS": str(args.stats)}
    start = time.perf_counter()
    _make_world(work, args.tars, args.tables)
    print(
        f"set-up: {args.tars} tars, {args.tables} score tables in {time.perf_counter() - start:.0f} s ({work})"
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    for name, label in (("tar_manifest", "tar_manifest"), ("sensor_new", "sensor tick, every tar new"),
                        ("sensor_idle", "sensor tick, nothing new"), ("schedule", "schedule tick"),
                        ("group_run", f"group run ({GROUP} tars)")):  # fmt: skip
        rows.append((label, _run_step(name, work, env)))
        print(f"{label:<40} {json.dumps(rows[-1][1])}", flush=True)
    cli = [sys.executable, "-m", "unifilter_core.cli"]
    tables_root = str(work / "tables_root")
    measured = [
        (f"catalog refresh ({args.tables} tables)", [*cli, "catalog", "refresh", "--root", tables_root]),
        (f"thresholds ({args.tables} tables)", [*cli, "thresholds", "--root", tables_root]),
    ]
    if args.exact_too:
        measured.append((f"thresholds exact ({args.tables} tables)",
                         [*cli, "thresholds", "--root", tables_root, "--method", "exact"]))  # fmt: skip
    for label, command in measured:
        res = _timed(command, env)
        rows.append((label, {"wall_s": res["wall_s"], "peak_mb": res["peak_mb"]}))
        print(f"{label:<40} {json.dumps(rows[-1][1])}", flush=True)
    rows.append((f"ingest ({args.stats} tables' stats)", _run_step("ingest_stats", work, env)))
    print(f"{rows[-1][0]:<40} {json.dumps(rows[-1][1])}", flush=True)
    res = _timed([*cli, "thresholds", "--root", str(work / "stats_root"), "--method", "stats"], env)
    rows.append(
        (f"thresholds ({args.stats} tables' stats)", {"wall_s": res["wall_s"], "peak_mb": res["peak_mb"]})
    )
    print(f"{rows[-1][0]:<40} {json.dumps(rows[-1][1])}", flush=True)
    print()
    print(f"{'step':<40} {'wall s':>8} {'peak MB':>8}  other")
    for label, r in rows:
        other = {k: v for k, v in r.items() if k not in ("wall_s", "peak_mb")}
        print(f"{label:<40} {r['wall_s']:>8.2f} {r['peak_mb']:>8}  {json.dumps(other) if other else ''}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
