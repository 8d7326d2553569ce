"""Train the world classifier with the demo's defaults and measure issue D's targets.

Writes the embedded world (default ``WorldConfig``) under ``--root`` unless it is already there, runs
``train_world_classifier`` (tokenizer, init + tower pre-training, stage 1, stage 2) with wall times per step, then
evaluates the classifier on the validation world (drawn with another seed) for captions and documents, with each
sample's own image and with images shuffled between samples (the classifier must use the image: Spearman has to
fall). Prints one line per figure and writes them to ``benchmarks/results/world_training.json``.

    python benchmarks/world_training.py --root /tmp/world          # about 6 minutes on 2 CPU cores
    python benchmarks/world_training.py --root /tmp/world --set stage2.num_train_epochs=3
    python benchmarks/world_training.py --root /tmp/world --seeds 0 1 2     # each seed, their mean and spread
    python benchmarks/world_training.py --root /tmp/w4k --world train_documents=4000

``--seeds`` trains once per seed on the same world (the seed drives the init, the tower pre-training, stage 1 and
stage 2: weights, data order, swap negatives) and reports each seed's figures, then the mean and the spread
(max - min) of each figure over the seeds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unifilter_core.synth import WorldConfig, read_world_manifest, write_world  # noqa: E402
from unifilter_core.training import evaluate_checkpoint, parse_override, train_world_classifier  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {"accuracy": 0.7, "spearman": 0.8, "shuffle_drop": 0.15, "seconds": 600}


def evaluate(classifier: Path, root: Path) -> dict[str, dict[str, float]]:
    out = {}
    for kind in ("caption", "interleaved"):
        val = root / "synthetic" / kind / "val.json"
        own = evaluate_checkpoint(classifier, val)
        shuffled = evaluate_checkpoint(classifier, val, shuffle_images=True)
        out[kind] = {
            "n": own["n"],
            "accuracy": round(own["accuracy"], 4),
            "spearman": round(own["spearman"], 4),
            "spearman_shuffled": round(shuffled["spearman"], 4),
            "shuffle_drop": round(own["spearman"] - shuffled["spearman"], 4),
            "mean_score_by_level": [round(x, 3) for x in own["mean_score_by_level"]],
            "confusion_matrix": own["confusion_matrix"],
        }
    return out


FIGURES = ("accuracy", "spearman", "shuffle_drop")


def train_one(root: Path, seed: int, overrides: dict[str, dict]) -> dict:
    """Train the world classifier with ``seed`` and return its times and validation figures."""
    stage1 = {"seed": seed, **overrides["stage1"]}
    stage2 = {"seed": seed, **overrides["stage2"]}
    classifier = train_world_classifier(root, stage1_overrides=stage1, stage2_overrides=stage2, seed=seed)
    times = json.loads((classifier / "pipeline_times.json").read_text())
    metrics = json.loads((classifier / "metrics.json").read_text())
    best = metrics.get("best") or {}
    return {
        "seed": seed,
        "training_seconds": {k: round(v, 1) for k, v in times.items()},
        "merged": {k: round(best[k], 4) for k in ("accuracy", "spearman") if k in best},
        "epochs": [
            (h["epoch"], round(h["accuracy"], 4), round(h["spearman"], 4)) for h in metrics["history"]
        ],
        "validation": evaluate(classifier, root),
    }


def spread_of(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Mean and spread (max - min) over the runs of each figure: merged validation, captions, documents."""
    series: dict[str, list[float]] = {}
    for run in runs:
        for key, value in run["merged"].items():
            series.setdefault(f"merged.{key}", []).append(value)
        for kind, figures in run["validation"].items():
            for key in FIGURES:
                series.setdefault(f"{kind}.{key}", []).append(figures[key])
        series.setdefault("training_seconds", []).append(run["training_seconds"]["total"])
    return {
        name: {"mean": round(sum(v) / len(v), 4), "spread": round(max(v) - min(v), 4), "values": v}
        for name, v in series.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--root", type=Path, required=True, help="data root (the world is written when missing)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="stageN.key=value",
        help="override a stage's preset field",
    )
    parser.add_argument(
        "--world",
        action="append",
        default=[],
        metavar="key=value",
        help="a WorldConfig field for a new world",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one run each")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "world_training.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    overrides: dict[str, dict] = {"stage1": {}, "stage2": {}}
    for item in args.set:
        stage, _, rest = item.partition(".")
        if stage not in overrides or not rest:
            parser.error(f"--set takes stage1.key=value or stage2.key=value, got {item!r}")
        key, value = parse_override(rest)
        overrides[stage][key] = value
    world = dict(parse_override(item) for item in args.world)
    start = time.perf_counter()
    if read_world_manifest(args.root) is None:
        write_world(args.root, WorldConfig(**world))
    elif world:
        parser.error(f"--world needs a new root: {args.root} already holds a world")
    world_s = time.perf_counter() - start
    runs = []
    for seed in args.seeds:
        run = train_one(args.root, seed, overrides)
        runs.append(run)
        print(f"seed {seed}: training seconds {run['training_seconds']}, merged validation {run['merged']}")
        for kind, m in run["validation"].items():
            print(
                f"seed {seed} {kind}: accuracy {m['accuracy']:.3f} spearman {m['spearman']:.3f} "
                f"shuffled {m['spearman_shuffled']:.3f} (drop {m['shuffle_drop']:.3f})"
            )
    result = {
        "overrides": overrides,
        "world": world,
        "world_seconds": round(world_s, 1),
        "runs": runs,
        "over_seeds": spread_of(runs),
        "targets": TARGETS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, figure in result["over_seeds"].items():
        print(f"{name}: mean {figure['mean']:.4f} spread {figure['spread']:.4f} over seeds {args.seeds}")
    last = runs[-1]
    caption = last["validation"]["caption"]
    met = (
        caption["accuracy"] >= TARGETS["accuracy"]
        and caption["spearman"] >= TARGETS["spearman"]
        and caption["shuffle_drop"] >= TARGETS["shuffle_drop"]
        and last["training_seconds"]["total"] <= TARGETS["seconds"]
    )
    print(
        f"issue D targets on the caption validation world (seed {last['seed']}): {'met' if met else 'NOT met'}"
    )
    print(f"figures -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
