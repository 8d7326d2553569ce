"""Length bucketing and the model call with per-sample fallback.

Within a window of prepared samples, samples are sorted by spliced length and cut into batches of at most
``batch_size`` samples and ``max_batch_tokens`` padded tokens, so a batch pads to a length close to each of its
samples. Scores do not depend on the batch (right padding, last real token), so the order is free.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unifilter_core.head_scores import LabelScore
from unifilter_core.records import Reason, ScoreResult

logger = logging.getLogger(__name__)


def plan_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Group sample positions into batches of similar length.

    Args:
        lengths: spliced length (``n_tokens``) of each sample.
        batch_size: most samples per batch.
        max_batch_tokens: most padded tokens per batch (``len(batch) * max(lengths in batch)``); a sample longer
            than the budget forms a batch alone. None = no budget.

    Returns:
        Lists of positions into ``lengths``; every position appears exactly once; shortest batches first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # ascending order: the new sample is the longest, so the padded size becomes (n + 1) * lengths[i]
        over_budget = max_batch_tokens is not None and (len(current) + 1) * lengths[i] > max_batch_tokens
        if current and (len(current) == batch_size or over_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class BatchRunner:
    """Calls ``scorer.forward`` on batches and turns the output into rows; records the model time.

    A batch that raises is retried one sample at a time, so one bad sample (or an out-of-memory batch) costs at
    most that sample, which gets a ``model_error`` row.

    Args:
        scorer: a ``unifilter_core.scorer.Scorer`` (``forward(list[PreparedSample]) -> list[float]``).
    """

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.model_s = 0.0
        self.batches = 0
        self.model_errors = 0

    def _forward(self, samples: list[Any]) -> list[float | LabelScore]:
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                scores = self.scorer.forward(samples)
        finally:
            self.model_s += time.perf_counter() - start
            self.batches += 1
        if len(scores) != len(samples):
            raise RuntimeError(f"scorer.forward returned {len(scores)} scores for {len(samples)} samples")
        return list(scores)  # floats, or LabelScores (floats with the class outputs) for classification heads

    def run(self, samples: list[Any]) -> list[ScoreResult]:
        """Score one batch of ``PreparedSample``; results in the same order."""
        try:
            scores: list[float | None] = list(self._forward(samples))
            errors: list[str | None] = [None] * len(samples)
        except Exception as exc:
            if len(samples) == 1:
                scores, errors = [None], [f"{type(exc).__name__}: {exc}"]
            else:
                logger.warning(
                    "batch of %d failed (%s: %s); retrying one by one", len(samples), type(exc).__name__, exc
                )
                scores, errors = [], []
                for sample in samples:
                    try:
                        scores.append(self._forward([sample])[0])
                        errors.append(None)
                    except Exception as one_exc:
                        scores.append(None)
                        errors.append(f"{type(one_exc).__name__}: {one_exc}")
        return [
            self._result(sample, score, error)
            for sample, score, error in zip(samples, scores, errors, strict=True)
        ]

    def _result(self, sample: Any, score: float | None, error: str | None) -> ScoreResult:
        if error is not None or score is None:
            self.model_errors += 1
            logger.warning("model error on a sample (%d tokens): %s", sample.n_tokens, error)
            return ScoreResult.failed(
                Reason.MODEL_ERROR, error, n_images=sample.n_images, n_tokens=sample.n_tokens
            )
        result = ScoreResult(
            score=float(np.float32(score)),
            n_images=int(sample.n_images),
            n_tokens=int(sample.n_tokens),
            truncated=bool(sample.truncated),
            detail=sample.detail,
        )
        if type(score) is not float and isinstance(score, LabelScore):  # regression scores are plain floats
            result.quality_class = score.quality_class
            result.expected_level = float(np.float32(score.expected_level))
        return result

    def run_window(
        self, samples: list[Any], batch_size: int, max_batch_tokens: int | None
    ) -> list[ScoreResult]:
        """Score a window of samples with length bucketing; results in the window's order."""
        results: list[ScoreResult | None] = [None] * len(samples)
        for batch in plan_batches([s.n_tokens for s in samples], batch_size, max_batch_tokens):
            for i, result in zip(batch, self.run([samples[i] for i in batch]), strict=True):
                results[i] = result
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]
