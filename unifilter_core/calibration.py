"""Calibration of the classifier on its validation pairs, and the reference distributions drift checks use.

For a regression head the predicted level is ``round(clamp(score, 0, 3))`` (the released recipe's accuracy). The
report gives, per true level, the number of pairs, the mean and spread of the predicted score and the share
predicted at that level; and the expected calibration error (ECE): over equal-width bins of the predicted score
(``bins`` over [0, 3]), the pair-weighted mean of ``|mean predicted - mean true level|``. A perfectly calibrated
regression head has ECE 0 (each score bin's pairs have, on average, the level the score says).

:func:`write_reference` scores the validation pairs of each kind with a checkpoint and writes
``<models>/reference/<model fingerprint>.json``: per kind, the calibration report, the fine histogram of the
scores (the drift reference of tars of that kind, :mod:`unifilter_core.drift`) and the canary set
(:mod:`unifilter_core.canary`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from unifilter_core import paths
from unifilter_core.catalog.schema import FINE_BINS, FINE_LO, FINE_WIDTH

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference"


def calibration_report(
    scores: np.ndarray, levels: np.ndarray, num_levels: int = 4, bins: int = 12
) -> dict[str, Any]:
    """Per-level figures and the ECE of continuous ``scores`` against true ``levels`` (see the module doc)."""
    scores = np.asarray(scores, dtype=np.float64)
    levels = np.asarray(levels, dtype=np.int64)
    if scores.shape != levels.shape or scores.ndim != 1:
        raise ValueError(
            f"scores and levels must be 1-D and of one length, got {scores.shape} and {levels.shape}"
        )
    predicted = np.rint(np.clip(scores, 0, num_levels - 1)).astype(np.int64)
    per_level = []
    for level in range(num_levels):
        mine = levels == level
        n = int(mine.sum())
        per_level.append({
            "level": level, "n": n,
            "mean_score": float(scores[mine].mean()) if n else None,
            "std_score": float(scores[mine].std()) if n else None,
            "predicted_share": float((predicted[mine] == level).mean()) if n else None,
        })  # fmt: skip
    edges = np.linspace(0.0, num_levels - 1, bins + 1)
    which = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, bins - 1)
    ece = 0.0
    reliability = []
    for b in range(bins):
        mine = which == b
        n = int(mine.sum())
        if not n:
            continue
        gap = abs(float(scores[mine].mean()) - float(levels[mine].mean()))
        ece += n / len(scores) * gap
        reliability.append({"from": float(edges[b]), "to": float(edges[b + 1]), "n": n,
                            "mean_score": float(scores[mine].mean()), "mean_level": float(levels[mine].mean())})  # fmt: skip
    return {
        "n": int(len(scores)),
        "ece": float(ece) if len(scores) else None,
        "accuracy": float((predicted == levels).mean()) if len(scores) else None,
        "per_level": per_level,
        "reliability": reliability,
    }


def fine_histogram(scores: np.ndarray) -> tuple[list[int], list[int]]:
    """The sparse fine histogram (bins, counts) of scores, the binning of ``score_stats.fine_bins``."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    bins = np.clip(np.floor((scores - FINE_LO) / FINE_WIDTH), 0, FINE_BINS - 1).astype(np.int64)
    values, counts = np.unique(bins, return_counts=True)
    return values.tolist(), counts.tolist()


def reference_path(root: Path, model_fingerprint: str) -> Path:
    return paths.models_dir(root) / REFERENCE_DIR / f"{model_fingerprint}.json"


def write_reference(root: Path, checkpoint: Path, model_fingerprint: str) -> dict[str, Any]:
    """Score each kind's validation pairs (``synthetic/<kind>/val.json``) with ``checkpoint``; write and return
    the reference document (kinds without validation pairs are absent)."""
    from unifilter_core.canary import pick_canary
    from unifilter_core.data import write_manifest_json
    from unifilter_core.scorer import load_scorer
    from unifilter_core.training.evaluate import validation_scores

    kinds: dict[str, Any] = {}
    scorer = None
    for kind in ("caption", "interleaved"):
        val = paths.synthetic_dir(root, kind) / "val.json"
        if not val.is_file():
            continue
        scores, levels = validation_scores(checkpoint, val)
        bins, counts = fine_histogram(scores)
        scorer = scorer or load_scorer(checkpoint, device="cpu", dtype="float32")
        kinds[kind] = {"n": int(len(scores)), "fine_bins": bins, "fine_counts": counts,
                       "calibration": calibration_report(scores, levels),
                       "canary": pick_canary(kind, val, scorer, scores)}  # fmt: skip
    doc = {"model_fingerprint": model_fingerprint, "checkpoint": str(checkpoint), "kinds": kinds}
    write_manifest_json(reference_path(root, model_fingerprint), doc)
    return doc


def read_reference(root: Path, model_fingerprint: str | None) -> dict[str, Any] | None:
    """The reference document of a model, or None when none was written (a checkpoint never validated here)."""
    if not model_fingerprint:
        return None
    path = reference_path(root, model_fingerprint)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
