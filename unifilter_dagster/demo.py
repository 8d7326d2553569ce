"""``unifilter demo``: the whole asset graph on the embedded world, through a real Dagster instance.

The instance lives under the data root (``<root>/dagster`` unless ``DAGSTER_HOME`` is set), so the runs show in
``dagster dev`` (``unifilter ui``) afterwards.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import dagster as dg

from unifilter_core import paths

logger = logging.getLogger(__name__)

UPSTREAM = [
    "synthetic_caption_pairs",
    "synthetic_interleaved_pairs",
    "llava_pretrain_subset",
    "stage1_projector",
    "stage2_classifier",
    "tar_manifest",
]
_MINIMAL_INSTANCE_YAML = "telemetry:\n  enabled: false\n"


def prepare_dagster_home(root: Path) -> Path:
    """``DAGSTER_HOME`` (set it to ``<root>/dagster`` when unset) holding the project's ``dagster.yaml``."""
    home = Path(os.environ.get("DAGSTER_HOME") or root / "dagster").resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists():
        project_yaml = Path(__file__).resolve().parents[1] / "dagster.yaml"
        if project_yaml.is_file():
            shutil.copyfile(project_yaml, target)
        else:
            target.write_text(_MINIMAL_INSTANCE_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _materialize(
    selection: list[str], resources: dict[str, Any], instance: dg.DagsterInstance, **kw: Any
) -> dg.ExecuteInProcessResult:
    from unifilter_dagster.definitions import ALL_ASSETS

    result = dg.materialize(ALL_ASSETS, selection=selection, resources=resources, instance=instance, **kw)
    if not result.success:
        raise RuntimeError(f"materializing {selection} failed (run {result.run_id}); see `unifilter ui`")
    return result


def run_demo(
    root: Path,
    *,
    keep_fraction: float = 0.3,
    world: dict[str, int] | None = None,
    stage1_overrides: list[str] | None = None,
    stage2_overrides: list[str] | None = None,
    echo: Any = print,
) -> dict[str, Any]:
    """Materialize every asset on the embedded world, then measure the filtering against the hidden levels.

    Args:
        root: the data root.
        keep_fraction: share of each source kept by ``quality_threshold``.
        world: WorldSettings overrides (sizes), e.g. for a quick run.
        stage1_overrides / stage2_overrides: ``key=value`` training overrides.
        echo: where progress lines go.

    Returns:
        Figures: accuracy, spearman, kept_precision, kept_recall, thresholds, seconds per step.
    """
    from unifilter_core.evaluation import filtering_quality
    from unifilter_core.partition_steps import read_thresholds
    from unifilter_dagster.resources import default_resources

    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    prepare_dagster_home(root)
    resources = default_resources(str(root), world=world)
    times: dict[str, float] = {}
    with dg.DagsterInstance.get() as instance:
        start = time.perf_counter()
        echo("demo: generating the world's training data and training the classifier (a few minutes)...")
        run_config = {
            "ops": {
                "stage1_projector": {"config": {"overrides": stage1_overrides or []}},
                "stage2_classifier": {"config": {"overrides": stage2_overrides or []}},
            }
        }
        _materialize(UPSTREAM, resources, instance, run_config=run_config)
        times["upstream"] = time.perf_counter() - start
        keys = sorted(instance.get_dynamic_partitions("tars"))
        t = time.perf_counter()
        for key in keys:
            echo(f"demo: scoring partition {key}")
            _materialize(["scores"], resources, instance, partition_key=key)
        times["scores"] = time.perf_counter() - t
        t = time.perf_counter()
        threshold_config = {"ops": {"quality_threshold": {"config": {"keep_fraction": keep_fraction}}}}
        _materialize(["quality_threshold"], resources, instance, run_config=threshold_config)
        for key in keys:
            _materialize(["filtered_dataset"], resources, instance, partition_key=key)
        times["filter"] = time.perf_counter() - t
    thresholds = read_thresholds(root)
    metrics = json.loads((_classifier_dir(root) / "metrics.json").read_text())
    best = metrics.get("best") or {}
    quality = filtering_quality(root, {s: row["threshold"] for s, row in thresholds.items()})
    times["total"] = sum(times.values())
    return {
        "accuracy": best.get("accuracy"),
        "spearman": best.get("spearman"),
        "kept_precision": quality["kept_precision"],
        "kept_recall": quality["kept_recall"],
        "quality": quality,
        "thresholds": thresholds,
        "partitions": keys,
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }


def _classifier_dir(root: Path) -> Path:
    pointer = paths.models_dir(root) / "active_classifier.json"
    if pointer.is_file():
        return Path(json.loads(pointer.read_text())["path"])
    return paths.models_dir(root) / "stage2_classifier"
