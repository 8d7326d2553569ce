"""``unifilter demo`` and ``unifilter ui``: subcommands this package adds to the core CLI (entry points)."""

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from unifilter_core import paths
from unifilter_core.cli import CLIError


def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole asset graph on the embedded world through Dagster",
        description="Materialize every asset on the embedded world (world data, training, scoring, threshold, "
        "filtered tars) in a Dagster instance under the data root, then report how well filtering worked.",
    )
    p.add_argument("--root", help="data root (default: $UNIFILTER_HOME or ./.unifilter)")
    p.add_argument("--keep", type=float, default=0.3, help="share of each source to keep (default 0.3)")
    p.add_argument("--quick", action="store_true", help="a small world and short training (a smoke test)")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=_demo)


QUICK_WORLD = {
    "train_images": 200,
    "val_images": 50,
    "train_documents": 40,
    "val_documents": 20,
    "pretrain_images": 100,
    "caption_tars": 1,
    "caption_tar_samples": 60,
    "interleaved_tars": 1,
    "interleaved_tar_docs": 20,
}
QUICK_STAGE1 = ["num_train_epochs=1"]
QUICK_STAGE2 = ["num_train_epochs=8"]  # 1 epoch of the quick world stays at chance; 8 learn (~1 min)


def _demo(args: argparse.Namespace) -> int:
    import time

    from unifilter_dagster.demo import output_to_log, run_demo

    if not 0 < args.keep <= 1:
        raise CLIError(f"--keep must be in (0, 1], got {args.keep}")
    root = paths.data_root(args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    options = {
        "keep_fraction": args.keep,
        "world": QUICK_WORLD if args.quick else None,
        "stage1_overrides": QUICK_STAGE1 if args.quick else None,
        "stage2_overrides": QUICK_STAGE2 if args.quick else None,
    }
    start = time.perf_counter()

    def stamp(out: Any) -> Any:
        return lambda line: print(f"demo [{time.perf_counter() - start:5.0f} s] {line}", file=out, flush=True)

    if args.verbose:  # everything on the terminal, as it comes
        result = run_demo(root, echo=stamp(sys.stdout), **options)
    else:
        with output_to_log(root) as (console, log_path):
            print(
                f"demo: data root {root}; the full log goes to {log_path} (`unifilter -v demo` shows it here)",
                file=console,
            )
            result = run_demo(root, echo=stamp(console), dagster_log_level="CRITICAL", **options)
    _report(root, result, args.json)
    return 0


def _report(root: Path, result: dict[str, Any], as_json: bool) -> None:
    """The per-source table (threshold, kept, precision, recall of level 3) and the last ``demo:`` line."""
    print()
    print(f"{'source':<12} {'threshold':>9} {'kept':>6} {'of':>6} {'precision':>9} {'recall L3':>9}")
    for source, q in sorted(result["quality"]["by_source"].items()):
        threshold = (result["thresholds"].get(source) or {}).get("threshold")
        shown = f"{threshold:.4f}" if isinstance(threshold, float) else "-"
        print(f"{source:<12} {shown:>9} {q['kept']:>6} {q['samples']:>6} {q['kept_precision']:>9.3f} "
              f"{q['kept_recall']:>9.3f}")  # fmt: skip
    print()
    print(f"seconds per step: {result['seconds']}")
    print(f"filtered tars and dataset cards under {root / 'filtered'}; the runs in `unifilter ui`")
    if as_json:
        print(json.dumps(result, default=str, indent=2))
    acc, rho = result["accuracy"], result["spearman"]
    print(
        f"demo: accuracy={acc:.3f} spearman={rho:.3f} kept_precision={result['kept_precision']:.3f} "
        f"kept_recall={result['kept_recall']:.3f}"
    )


def register_ui(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="serve the Dagster UI (dagster dev) over the data root's instance")
    p.add_argument("--root", help="data root (default: $UNIFILTER_HOME or ./.unifilter)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=3000)
    p.set_defaults(func=_ui)


def _ui(args: argparse.Namespace) -> int:
    from unifilter_dagster.demo import prepare_dagster_home

    root = paths.data_root(args.root)
    root.mkdir(parents=True, exist_ok=True)
    prepare_dagster_home(root)
    env = {**os.environ, "UNIFILTER_HOME": str(root)}
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [str(dagster), "dev", "-m", "unifilter_dagster", "-h", args.host, "-p", str(args.port)]
    # its own process group, so that one signal stops dagster dev and the servers it starts
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        return proc.wait()
