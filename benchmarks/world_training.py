"""Train the world classifier with the demo's defaults and measure issue D's targets.

Writes the embedded world (default ``WorldConfig``) under ``--root`` unless it is already there, runs
``train_world_classifier`` (tokenizer, init + tower pre-training, stage 1, stage 2) with wall times per step, then
evaluates the classifier on the validation world (drawn with another seed) for captions and documents, with each
sample's own image and with images shuffled between samples (the classifier must use the image: Spearman has to
fall). Prints one line per figure and writes them to ``benchmarks/results/world_training.json``.

    python benchmarks/world_training.py --root /tmp/world          # about 8-9 minutes on 2 CPU cores
    python benchmarks/world_training.py --root /tmp/world --set stage2.num_train_epochs=3
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
    start = time.perf_counter()
    if read_world_manifest(args.root) is None:
        write_world(args.root, WorldConfig())
    world_s = time.perf_counter() - start
    classifier = train_world_classifier(
        args.root, stage1_overrides=overrides["stage1"], stage2_overrides=overrides["stage2"]
    )
    times = json.loads((classifier / "pipeline_times.json").read_text())
    history = json.loads((classifier / "metrics.json").read_text())["history"]
    result = {
        "overrides": overrides,
        "world_seconds": round(world_s, 1),
        "training_seconds": {k: round(v, 1) for k, v in times.items()},
        "epochs": [(h["epoch"], round(h["accuracy"], 4), round(h["spearman"], 4)) for h in history],
        "validation": evaluate(classifier, args.root),
        "targets": TARGETS,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    caption = result["validation"]["caption"]
    print(f"training seconds: {result['training_seconds']} (target <= {TARGETS['seconds']})")
    for kind, m in result["validation"].items():
        print(
            f"{kind}: accuracy {m['accuracy']:.3f} spearman {m['spearman']:.3f} "
            f"shuffled {m['spearman_shuffled']:.3f} (drop {m['shuffle_drop']:.3f})"
        )
    met = (
        caption["accuracy"] >= TARGETS["accuracy"]
        and caption["spearman"] >= TARGETS["spearman"]
        and caption["shuffle_drop"] >= TARGETS["shuffle_drop"]
        and times["total"] <= TARGETS["seconds"]
    )
    print(f"issue D targets on the caption validation world: {'met' if met else 'NOT met'}; -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
