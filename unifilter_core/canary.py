"""A canary set: a few validation pairs of known level whose scores the reference recorded, scored again by every
scoring run's own scorer, so that a changed scorer (other weights, preprocessing, dtype gone wrong) is caught.

:func:`pick_canary` takes two pairs per level of a kind's validation JSON (``synthetic/<kind>/val.json``, the
training format), turns them into the scorer's inputs (caption: the image and the text after ``<image>\\n``;
document: the ``\\n\\n``-separated slots, ``<image>`` slots taking the next image) and scores them with the
reference checkpoint's scorer; a pair whose scorer score differs from the training path's by more than 1e-3 is
left out (its conversion is not faithful). :func:`check_canary` scores the set with a run's scorer and compares.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PER_LEVEL = 2
#: the largest score change a run may show on the canary set (bf16 or another device moves scores by ~1e-2)
TOLERANCE = 0.05
_FAITHFUL = 1e-3


def _inputs(kind: str, pair: dict[str, Any], folder: Path) -> Any:
    images = pair["image"] if isinstance(pair["image"], list) else [pair["image"]]
    paths = [str((folder / p).resolve()) for p in images]
    text = str(pair["text"])
    if kind == "caption":
        return {"image": paths[0], "text": text.split("<image>\n", 1)[-1]}
    texts: list[str | None] = []
    slot_images: list[str | None] = []
    left = iter(paths)
    for slot in text.split("\n\n"):
        if slot.strip() == "<image>":
            texts.append(None)
            slot_images.append(next(left, None))
        else:
            texts.append(slot)
            slot_images.append(None)
    return {"texts": texts, "images": slot_images}


def _score(scorer: Any, kind: str, items: list[dict[str, Any]]) -> list[float | None]:
    from PIL import Image

    def load(path: str | None) -> Any:
        if path is None:
            return None
        with Image.open(path) as image:
            return image.convert("RGB")

    if kind == "caption":
        results = scorer.score_captions([(load(x["image"]), x["text"]) for x in items])
    else:
        results = scorer.score_documents(
            [{"texts": x["texts"], "images": [load(p) for p in x["images"]]} for x in items]
        )
    return [r.score if r.status == "ok" else None for r in results]


def pick_canary(kind: str, val: Path, scorer: Any, training_scores: np.ndarray) -> list[dict[str, Any]]:
    """Up to :data:`PER_LEVEL` pairs per level of ``val`` with their scorer scores (see the module doc)."""
    pairs = json.loads(val.read_text())
    chosen: list[tuple[int, dict[str, Any]]] = []
    count: dict[int, int] = {}
    for index, pair in enumerate(pairs):
        level = int(pair.get("label", -1))
        if count.get(level, 0) < PER_LEVEL:
            count[level] = count.get(level, 0) + 1
            chosen.append((index, pair))
    from unifilter_core.training.data import resolve_image_folder

    if not chosen:
        return []
    first = chosen[0][1]["image"]
    folder = resolve_image_folder(val, None, first[0] if isinstance(first, list) and first else first)
    items = [{**_inputs(kind, pair, folder), "level": int(pair["label"])} for _, pair in chosen]
    scores = _score(scorer, kind, items)
    canary = []
    for (index, _), item, score in zip(chosen, items, scores, strict=True):
        if score is None or index >= len(training_scores) or abs(score - training_scores[index]) > _FAITHFUL:
            logger.info(
                "canary: validation pair %d of %s left out (not scored alike by the scorer)", index, kind
            )
            continue
        canary.append({**item, "score": float(score)})
    return canary


def check_canary(scorer: Any, kind: str, canary: list[dict[str, Any]], tolerance: float = TOLERANCE) -> dict:
    """Score the canary set with ``scorer``: ``{"n", "max_abs_diff", "tolerance", "passed"}``."""
    scores = _score(scorer, kind, canary)
    diffs = [
        abs(s - c["score"]) if s is not None else float("inf") for s, c in zip(scores, canary, strict=True)
    ]
    worst = max(diffs, default=0.0)
    return {"n": len(canary), "max_abs_diff": round(worst, 6) if np.isfinite(worst) else None,
            "tolerance": tolerance, "passed": bool(worst <= tolerance)}  # fmt: skip
