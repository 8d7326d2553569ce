"""Models: the stage-1 projector and the stage-2 quality classifier (released checkpoint layout)."""

import json
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field

from unifilter_core import paths
from unifilter_dagster.assets._meta import CODE_VERSION, image_md, md_table, record, scalar_metadata, timed
from unifilter_dagster.assets.generation import (
    llava_pretrain_subset,
    synthetic_caption_pairs,
    synthetic_interleaved_pairs,
)
from unifilter_dagster.resources import ACTIVE_CLASSIFIER_FILE, UniFilterHome

ACCURACY_CHECK = "validation_accuracy_floor"


def _overrides(items: list[str]) -> dict[str, Any]:
    from unifilter_core.training import parse_override

    return dict(parse_override(item) for item in items)


class Stage1Settings(dg.Config):
    """Stage-1 training: a preset plus ``key=value`` overrides (docs/training.md)."""

    preset: str = Field(
        default="world", description="world (tiny CPU model) or released (the paper's recipe)"
    )
    model_path: str | None = Field(
        default=None,
        description="base checkpoint (released layout); world: a fresh init with the world tokenizer",
    )
    overrides: list[str] = Field(
        default_factory=list, description="e.g. ['num_train_epochs=2', 'learning_rate=1e-3']"
    )


@dg.asset(group_name="models", code_version=CODE_VERSION, deps=[llava_pretrain_subset], kinds={"pytorch"})
def stage1_projector(
    context: dg.AssetExecutionContext, config: Stage1Settings, home: UniFilterHome, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """Projector pre-training (next-token loss on LLaVA-Pretrain captions); weights in the released key names."""
    from unifilter_core.training import load_config, prepare_world_init, train_stage1, world_stage1_config

    root = home.root_path
    overrides = _overrides(config.overrides)
    with timed() as timing:
        if config.preset == "world" and config.model_path is None:
            base = prepare_world_init(root, seed=home.world.seed)  # tower pre-trained on the world under root
            stage1 = world_stage1_config(root, overrides=overrides, model_path=str(base))
        else:
            defaults = {
                "output_dir": str(paths.models_dir(root) / "stage1_projector"),
                "data_path": str(paths.pretrain_dir(root) / "blip_laion_cc_sbu_558k.json"),
                "image_folder": str(paths.pretrain_dir(root) / "images"),
            }
            if config.model_path:
                defaults["model_path"] = config.model_path
            stage1 = load_config(config.preset, "stage1", {**defaults, **overrides})
        out = train_stage1(stage1)
    metrics = json.loads((Path(out) / "stage1_metrics.json").read_text())
    record(home.catalog(duckdb), context, timing, rows=metrics.get("global_steps"))
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "preset": config.preset,
            "seconds": timing["seconds"],
            **scalar_metadata({k: v for k, v in metrics.items() if k != "data"}),
            **_tower_metadata(Path(stage1.model_path)),
        }
    )


def _tower_metadata(model_path: Path) -> dict[str, Any]:
    """Held-out accuracies of the world tower's pre-training (``vision_pretrain.json``), when the base has one."""
    report = model_path / "vision_pretrain.json"
    if not report.is_file():
        return {}
    data = json.loads(report.read_text())
    accuracy = {f"tower_{k}_accuracy": round(v, 4) for k, v in data["held_out_accuracy"].items()}
    return {**accuracy, "tower_pretrain_seconds": round(data["wall_seconds"], 1)}


class Stage2Settings(dg.Config):
    """Stage-2 training, or adopting an existing classifier (e.g. the released checkpoint)."""

    preset: str = "world"
    overrides: list[str] = Field(default_factory=list)
    use_checkpoint: str | None = Field(
        default=None,
        description="adopt this classifier instead of training (evaluated on the validation pairs when present)",
    )
    min_accuracy: float = Field(default=0.5, description="asset check floor on 4-level validation accuracy")


def _evaluate_existing(root: Path, checkpoint: str) -> dict[str, Any]:
    from unifilter_core.training import evaluate_checkpoint

    if not (Path(checkpoint) / "config.json").is_file():
        raise ValueError(f"use_checkpoint {checkpoint!r} is not a checkpoint folder (no config.json)")
    val = paths.synthetic_dir(root, "caption") / "val.json"
    if not val.is_file():
        return {"best": None, "history": []}
    report = evaluate_checkpoint(checkpoint, val)
    return {"best": report, "history": [report]}


def _train(root: Path, config: Stage2Settings) -> tuple[Path, dict[str, Any]]:
    from unifilter_core.training import load_config, train_stage2, world_stage2_config

    overrides = _overrides(config.overrides)
    s1 = paths.models_dir(root) / "stage1_projector"
    if config.preset == "world":
        stage2 = world_stage2_config(root, overrides=overrides, model_path=str(s1))
    else:
        defaults = {
            "model_path": str(s1),
            "output_dir": str(paths.models_dir(root) / "stage2_classifier"),
            "data_path": str(paths.synthetic_dir(root, "caption") / "train.json"),
            "eval_data_path": str(paths.synthetic_dir(root, "caption") / "val.json"),
        }
        stage2 = load_config(config.preset, "stage2", {**defaults, **overrides})
    out = Path(train_stage2(stage2))
    return out, json.loads((out / "metrics.json").read_text())


def _classifier_plots(metrics: dict[str, Any]) -> dict[str, dg.MetadataValue]:
    """Training curve, confusion matrix and per-level accuracy of a stage-2 ``metrics.json``."""
    from unifilter_core.plots import classifier_metrics_markdown, confusion_matrix_png, training_curves_png

    curve = training_curves_png(metrics.get("history") or [], metrics.get("training_curve") or [])
    out = {
        "training_curve": image_md(curve, "training curve"),
        "per_level_accuracy": dg.MetadataValue.md(classifier_metrics_markdown(metrics)),
    }
    matrix = (metrics.get("best") or {}).get("confusion_matrix")
    if matrix:
        out["confusion_matrix"] = image_md(confusion_matrix_png(matrix), "confusion matrix")
    return out


def _calibration_metadata(reference: dict[str, Any]) -> dict[str, Any]:
    """Per kind: the expected calibration error and, per true level, the mean predicted score and the share
    predicted at that level (validation pairs)."""
    out: dict[str, Any] = {}
    for kind, entry in (reference.get("kinds") or {}).items():
        report = entry["calibration"]
        out[f"{kind}_ece"] = round(report["ece"], 4) if report["ece"] is not None else "-"
        rows = [{"level": r["level"], "pairs": r["n"], "mean_score": r["mean_score"], "std": r["std_score"],
                 "predicted_at_level": r["predicted_share"]} for r in report["per_level"]]  # fmt: skip
        out[f"{kind}_calibration"] = md_table(rows)
    return out


@dg.asset(
    group_name="models",
    code_version=CODE_VERSION,
    deps=[stage1_projector, synthetic_caption_pairs, synthetic_interleaved_pairs],
    kinds={"pytorch"},
    check_specs=[dg.AssetCheckSpec(ACCURACY_CHECK, asset="stage2_classifier")],
)
def stage2_classifier(
    context: dg.AssetExecutionContext, config: Stage2Settings, home: UniFilterHome, duckdb: DuckDBResource
) -> dg.MaterializeResult:
    """The quality classifier (released layout) with its validation metrics; becomes the scoring model."""
    from unifilter_core.data import write_manifest_json
    from unifilter_core.scorer import checkpoint_fingerprint

    root = home.root_path
    with timed() as timing:
        if config.use_checkpoint:
            out = Path(config.use_checkpoint).expanduser().resolve()
            metrics = _evaluate_existing(root, str(out))
        else:
            out, metrics = _train(root, config)
    fingerprint = checkpoint_fingerprint(out)
    from unifilter_core.reference import write_reference

    reference = write_reference(root, out, fingerprint)  # calibration, and the drift reference of each kind
    write_manifest_json(
        paths.models_dir(root) / ACTIVE_CLASSIFIER_FILE, {"path": str(out), "fingerprint": fingerprint}
    )
    best = metrics.get("best") or {}
    record(
        home.catalog(duckdb),
        context,
        timing,
        model_fingerprint=fingerprint,
        rows=len(metrics.get("history", [])),
    )
    accuracy = best.get("accuracy")
    passed = accuracy is not None and accuracy >= config.min_accuracy
    check = dg.AssetCheckResult(
        check_name=ACCURACY_CHECK,
        passed=bool(passed),
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"accuracy": accuracy if accuracy is not None else "-", "floor": config.min_accuracy},
        description="4-level validation accuracy meets the configured floor",
    )
    scalars = {k: best.get(k) for k in ("accuracy", "spearman", "macro_f1") if k in best}
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(out)),
            "model_fingerprint": fingerprint,
            "seconds": timing["seconds"],
            **scalar_metadata(scalars),
            "history": dg.MetadataValue.json(metrics.get("history", [])),
            **_classifier_plots(metrics),
            **_calibration_metadata(reference),
        },
        check_results=[check],
    )
