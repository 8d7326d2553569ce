"""What a classification head reports per sample, carried through code that expects one float per sample.

``Scorer.forward`` returns one float per sample. For a regression head (``num_labels == 1``) that is a plain float
(the raw output). For a classification head (``num_labels >= 2``) it is a :class:`LabelScore`: a float equal to
the softmax probability of class 1 (the original code's score) that also carries the argmax class and the
expected level ``sum_k k * P(class k)``. Wrappers that pass the list through keep both.
"""

from __future__ import annotations

from typing import Any


class LabelScore(float):
    """P(class 1) of a classification head, with ``quality_class`` (argmax) and ``expected_level``."""

    __slots__ = ("quality_class", "expected_level")
    quality_class: int
    expected_level: float

    def __new__(cls, score: float, quality_class: int, expected_level: float) -> LabelScore:
        obj = super().__new__(cls, score)
        obj.quality_class = int(quality_class)
        obj.expected_level = float(expected_level)
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (LabelScore, (float(self), self.quality_class, self.expected_level))

    def __repr__(self) -> str:
        return f"LabelScore({float(self)!r}, quality_class={self.quality_class}, expected_level={self.expected_level!r})"


def label_scores(rows: list[list[float]]) -> list[LabelScore]:
    """``[[P(class 1), argmax, expected level], ...]`` (a ``tolist()`` of a ``[B, 3]`` tensor) -> LabelScores."""
    return [LabelScore(score, int(cls), level) for score, cls, level in rows]
