"""Evaluation metrics of a quality classifier: 4-level accuracy, macro P/R/F1, Spearman, confusion matrix.

Predicted levels are ``round(clamp(score, 0, L-1))`` for a 1-output (regression) head, the released recipe's
accuracy, and the argmax for a class head. Spearman is computed on the continuous scores (expected level for a
class head), which also ranks samples within a level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import spearmanr


def predicted_levels(logits: np.ndarray, num_levels: int = 4) -> np.ndarray:
    """Levels predicted by head outputs.

    Args:
        logits: ``[N, num_labels]`` (or ``[N]`` for a regression head).
        num_levels: levels 0..num_levels-1.

    Returns:
        ``[N]`` int64.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 1 or logits.shape[-1] == 1:
        scores = logits.reshape(-1)
        return np.rint(np.clip(scores, 0, num_levels - 1)).astype(np.int64)
    return logits.argmax(axis=-1).astype(np.int64)


def scores_of(logits: np.ndarray) -> np.ndarray:
    """Continuous scores: the raw output of a 1-output head, else the expected level under the softmax."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return logits.reshape(-1)
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    return (p * np.arange(logits.shape[-1])).sum(axis=-1)


def spearman(scores: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (0.0 when undefined: constant scores or labels, fewer than 2 samples)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if scores.size < 2 or np.all(scores == scores[0]) or np.all(labels == labels[0]):
        return 0.0
    value = float(spearmanr(scores, labels).statistic)
    return 0.0 if math.isnan(value) else value


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_levels: int = 4) -> np.ndarray:
    """``[L, L]`` counts, rows = true level, columns = predicted level."""
    matrix = np.zeros((num_levels, num_levels), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def macro_prf(matrix: np.ndarray) -> tuple[float, float, float]:
    """Macro precision, recall and F1 over the levels that occur as a label or a prediction.

    A level never predicted has precision 0, one never true has recall 0 (scikit-learn's convention).
    """
    tp = np.diag(matrix).astype(np.float64)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    present = (predicted + actual) > 0
    if not present.any():
        return 0.0, 0.0, 0.0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(precision[present].mean()), float(recall[present].mean()), float(f1[present].mean())


def classification_report(logits: np.ndarray, labels: np.ndarray, num_levels: int = 4) -> dict[str, Any]:
    """Every metric of one evaluation.

    Args:
        logits: ``[N, num_labels]`` head outputs (or ``[N]`` scores of a regression head).
        labels: ``[N]`` true levels 0..num_levels-1.
        num_levels: number of quality levels.

    Returns:
        JSON-ready dict: ``accuracy``, ``macro_precision``, ``macro_recall``, ``macro_f1``, ``spearman``,
        ``confusion_matrix`` (rows true, columns predicted), ``mean_score_by_level`` (None for an absent
        level), ``n``.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_levels):
        raise ValueError(f"labels must lie in 0..{num_levels - 1}")
    levels = predicted_levels(logits, num_levels)
    scores = scores_of(logits)
    if levels.shape[0] != labels.shape[0]:
        raise ValueError(f"{levels.shape[0]} predictions for {labels.shape[0]} labels")
    matrix = confusion_matrix(labels, levels, num_levels)
    precision, recall, f1 = macro_prf(matrix)
    means = [float(scores[labels == k].mean()) if (labels == k).any() else None for k in range(num_levels)]
    return {
        "accuracy": float((levels == labels).mean()) if labels.size else 0.0,
        "macro_precision": precision,
        "macro_recall": recall,
        "macro_f1": f1,
        "spearman": spearman(scores, labels),
        "confusion_matrix": matrix.tolist(),
        "mean_score_by_level": means,
        "n": int(labels.size),
    }


SCALAR_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "spearman")
