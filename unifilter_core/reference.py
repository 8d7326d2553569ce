"""A model's reference, written by ``stage2_classifier``: ``<models>/reference/<model fingerprint>.json``.

Per kind with validation pairs (``synthetic/<kind>/val.json``): the calibration report
(:mod:`unifilter_core.calibration`), the fine histogram of the validation scores (the drift reference of tars of
that kind, :mod:`unifilter_core.drift`) and the canary set (:mod:`unifilter_core.canary`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from unifilter_core import paths
from unifilter_core.calibration import calibration_report
from unifilter_core.canary import TOLERANCE, check_canary, pick_canary
from unifilter_core.catalog.stats import fine_histogram

logger = logging.getLogger(__name__)

REFERENCE_DIR = "reference"


def reference_path(root: Path, model_fingerprint: str) -> Path:
    return paths.models_dir(root) / REFERENCE_DIR / f"{model_fingerprint}.json"


def write_reference(root: Path, checkpoint: Path, model_fingerprint: str) -> dict[str, Any]:
    """Score each kind's validation pairs (``synthetic/<kind>/val.json``) with ``checkpoint``; write and return
    the reference document (kinds without validation pairs are absent)."""
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


def run_canary(root: Path, scorer: Any, kind: str, tolerance: float = TOLERANCE) -> dict[str, Any] | None:
    """:func:`check_canary` with the canary set the reference of the scorer's model recorded for ``kind``; None
    when there is none (a checkpoint never validated here). The result names the reference model."""
    doc = read_reference(root, scorer.model_fingerprint)
    canary = (((doc or {}).get("kinds") or {}).get(kind) or {}).get("canary")
    if not canary:
        return None
    return {**check_canary(scorer, kind, canary, tolerance), "reference": scorer.model_fingerprint}
