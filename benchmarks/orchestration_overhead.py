"""Per-tar orchestration overhead through Dagster: single-tar partitions against one group of 32 tars.

Run from the repository root (CPU, about two minutes)::

    python benchmarks/orchestration_overhead.py
    python benchmarks/orchestration_overhead.py --tars 32 --single-runs 8 --samples 40

Writes ``--tars`` caption tars and a random-init ``world`` checkpoint, then scores them the way a user does, with
the Dagster CLI (``dagster asset materialize -m unifilter_dagster --select scores --partition KEY``, one process
per run, resources given with ``--config-json``):

* ``single``: a source with ``group_size`` 1; ``--single-runs`` of its partitions, one run (one process, one
  model load) per tar;
* ``grouped``: the same tars under a source with ``group_size`` = ``--tars``; one run for the whole group.

Overhead per tar = (wall time of the runs - the engine's own scoring time, ``timings.wall_s`` of each tar's
manifest) / tars scored. It holds the process start, Dagster's start-up, the model load, resolving the tars,
catalog writes and checks. Prints both figures side by side; the last line reads
``per-tar overhead: single=<seconds> grouped=<seconds>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _dagster() -> str:
    return str(Path(sys.executable).with_name("dagster"))


def _run_config(root: Path, ckpt: Path, group_size: int) -> str:
    home = {"root": str(root), "use_world": False,
            "sources": [{"name": "bench", "kind": "caption", "group_size": group_size}]}  # fmt: skip
    scoring = {"checkpoint": str(ckpt), "device": "cpu", "num_workers": 0}
    return json.dumps({"resources": {"home": {"config": home}, "scoring_model": {"config": scoring}}})


def _materialize(root: Path, config: str, select: str, partition: str | None, env: dict[str, str]) -> float:
    args = [
        _dagster(),
        "asset",
        "materialize",
        "-m",
        "unifilter_dagster",
        "--select",
        select,
        "--config-json",
        config,
    ]
    if partition:
        args += ["--partition", partition]
    start = time.perf_counter()
    done = subprocess.run(
        args, cwd=REPO, env={**env, "UNIFILTER_HOME": str(root)}, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:8])} failed:\n{done.stderr[-3000:]}")
    return wall


def _engine_seconds(root: Path, names: list[str]) -> float:
    folder = root / "scores" / "bench"
    return sum(json.loads((folder / f"{n}.manifest.json").read_text())["timings"]["wall_s"] for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tars", type=int, default=32, help="tars of the group (and of the source)")
    parser.add_argument("--single-runs", type=int, default=8, help="single-tar partitions to time")
    parser.add_argument("--samples", type=int, default=40, help="captions per tar")
    args = parser.parse_args()

    from tests.tarfixtures import caption_members, noise_jpeg, write_tar
    from unifilter_core.modeling import init_checkpoint
    from unifilter_core.tokenization import train_bpe_tokenizer

    work = Path(tempfile.mkdtemp(prefix="unifilter-overhead-"))
    texts = [f"a photo of thing number {i} on a table" for i in range(args.samples)]
    shards = work / "shards"
    for t in range(args.tars):
        members = []
        for i, text in enumerate(texts):
            members += caption_members(f"{t:04d}{i:05d}", image=noise_jpeg(64, seed=t * 1000 + i), text=text)
        write_tar(shards / f"{t:08d}.tar", members)
    ckpt = Path(
        init_checkpoint(
            "world", work / "ckpt", tokenizer_dir=train_bpe_tokenizer(texts, work / "tok"), seed=0
        )
    )
    dagster_home = work / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PYTHONPATH": str(REPO)}

    roots = {"single": work / "single", "grouped": work / "grouped"}
    sizes = {"single": 1, "grouped": args.tars}
    configs = {}
    for mode, root in roots.items():
        (root / "sources").mkdir(parents=True)
        (root / "sources" / "bench").symlink_to(shards, target_is_directory=True)
        configs[mode] = _run_config(root, ckpt, sizes[mode])
        _materialize(root, configs[mode], "tar_manifest", None, env)  # registration: not part of the figures

    names = [f"{t:08d}" for t in range(args.tars)]
    single_walls = []
    for t in range(args.single_runs):
        single_walls.append(_materialize(roots["single"], configs["single"], "scores", f"bench_{t:04d}", env))
    single_engine = _engine_seconds(roots["single"], names[: args.single_runs])
    group_key = f"bench_0000-{args.tars - 1:04d}"
    group_wall = _materialize(roots["grouped"], configs["grouped"], "scores", group_key, env)
    group_engine = _engine_seconds(roots["grouped"], names)

    single = (sum(single_walls) - single_engine) / args.single_runs
    grouped = (group_wall - group_engine) / args.tars
    print(
        f"{args.tars} tars x {args.samples} captions, world checkpoint, CPU; one `dagster asset materialize` per run"
    )
    print(f"{'mode':<8} {'runs':>5} {'tars':>5} {'wall s':>8} {'engine s':>9} {'overhead s/tar':>15}")
    print(f"{'single':<8} {args.single_runs:>5} {args.single_runs:>5} {sum(single_walls):>8.2f} {single_engine:>9.2f} "
          f"{single:>15.3f}   (median run {statistics.median(single_walls):.2f} s)")  # fmt: skip
    print(f"{'grouped':<8} {1:>5} {args.tars:>5} {group_wall:>8.2f} {group_engine:>9.2f} {grouped:>15.3f}")
    print(f"single / grouped overhead per tar: {single / grouped:.1f}x")
    shutil.rmtree(work, ignore_errors=True)
    print(f"per-tar overhead: single={single:.3f} grouped={grouped:.3f}")


if __name__ == "__main__":
    main()
