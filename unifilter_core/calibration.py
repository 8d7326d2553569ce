"""Calibration of the classifier on its validation pairs, and the reference distributions drift checks use.

For a regression head the predicted level is ``round(clamp(score, 0, 3))`` (the released recipe's accuracy). The
report gives, per true level, the number of pairs, the mean and spread of the predicted score and the share
predicted at that level; and the expected calibration error (ECE): over equal-width bins of the predicted score
(``bins`` over [0, 3]), the pair-weighted mean of ``|mean predicted - mean true level|``. A perfectly calibrated
regression head has ECE 0 (each score bin's pairs have, on average, the level the score says).

:mod:`unifilter_core.reference` writes these figures, per kind, into a model's reference file.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
