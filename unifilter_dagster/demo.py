"""``unifilter demo``: the whole asset graph on the embedded world, through a real Dagster instance.

The instance lives under the data root (``<root>/dagster`` unless ``DAGSTER_HOME`` is set), so the runs show in
``dagster dev`` (``unifilter ui``) afterwards.
"""

import contextlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

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
_STEP_NAMES = {
    "synthetic_caption_pairs": "synthetic caption pairs",
    "synthetic_interleaved_pairs": "synthetic interleaved pairs",
    "llava_pretrain_subset": "LLaVA-Pretrain caption subset",
    "stage1_projector": "stage-1 projector trained",
    "stage2_classifier": "stage-2 classifier trained and calibrated",
    "tar_manifest": "source tars registered",
}
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
    dagster_log_level: str = "DEBUG",
) -> dict[str, Any]:
    """Materialize every asset on the embedded world, then measure the filtering against the hidden levels.

    Args:
        root: the data root.
        keep_fraction: share of each source kept by ``quality_threshold``.
        world: WorldSettings overrides (sizes), e.g. for a quick run.
        stage1_overrides / stage2_overrides: ``key=value`` training overrides.
        echo: where progress lines go (one per step).
        dagster_log_level: the runs' console log level (``CRITICAL`` keeps Dagster's event lines out of a quiet
            run; they stay in the instance's event log, ``unifilter ui``).

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
    logger_config = {"loggers": {"console": {"config": {"log_level": dagster_log_level}}}}
    times: dict[str, float] = {}
    with dg.DagsterInstance.get() as instance:
        start = time.perf_counter()
        overrides = {"stage1_projector": stage1_overrides or [], "stage2_classifier": stage2_overrides or []}
        for name in UPSTREAM:
            t = time.perf_counter()
            ops = {name: {"config": {"overrides": overrides[name]}}} if name in overrides else {}
            _materialize([name], resources, instance, run_config={"ops": ops, **logger_config})
            echo(f"{_STEP_NAMES.get(name, name)} ({time.perf_counter() - t:.0f} s)")
        times["upstream"] = time.perf_counter() - start
        keys = sorted(instance.get_dynamic_partitions("tars"))
        t = time.perf_counter()
        for i, key in enumerate(keys, 1):
            _materialize(["scores"], resources, instance, partition_key=key, run_config=logger_config)
            echo(f"scored {key} ({i}/{len(keys)})")
        times["scores"] = time.perf_counter() - t
        t = time.perf_counter()
        threshold_config = {
            "ops": {"quality_threshold": {"config": {"keep_fraction": keep_fraction}}},
            **logger_config,
        }
        _materialize(["quality_threshold"], resources, instance, run_config=threshold_config)
        echo(f"chose the thresholds that keep {keep_fraction:.0%} of each source")
        for key in keys:
            _materialize(
                ["filtered_dataset"], resources, instance, partition_key=key, run_config=logger_config
            )
        echo(f"wrote the filtered tars of {len(keys)} partitions and the dataset cards")
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


@contextlib.contextmanager
def output_to_log(root: Path) -> Iterator[tuple[TextIO, Path]]:
    """Send everything this process (and its children) writes to stdout and stderr, and every log record, to
    ``<root>/logs/demo-<time>.log``; yields ``(console, log path)``, console being the terminal's stdout.

    File descriptors 1 and 2 are redirected (not only ``sys.stdout``), so the output of libraries that print
    (Trainer loss lines, DeepSpeed's op build, alembic) lands in the file too.
    """
    log_path = root / "logs" / f"demo-{datetime.now():%Y%m%d-%H%M%S}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    root_logger = logging.getLogger()
    handlers, level = root_logger.handlers[:], root_logger.level
    with open(log_path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root_logger.handlers = [handler]
        root_logger.setLevel(logging.INFO)
        try:
            yield console, log_path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            root_logger.handlers, root_logger.level = handlers, level
            console.close()
