"""Evaluate a trained classifier on UniFilter-format validation data, optionally with images shuffled.

Shuffling images between samples (each sample gets another sample's image(s), same count) measures how much the
classifier relies on the image: a model that reads only the text keeps its Spearman correlation.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from unifilter_core.training.data import Collator, QualityDataset
from unifilter_core.training.metrics import classification_report, scores_of

logger = logging.getLogger(__name__)


def shuffle_dataset_images(dataset: QualityDataset, seed: int = 0) -> None:
    """Give each entry another entry's image tuple (same image count), in place.

    Entries that share an image (several texts of one image) never get that same image back, except when a group
    has a single distinct image tuple.
    """
    rng = random.Random(seed)
    groups: dict[int, list[int]] = {}
    for i, entry in enumerate(dataset.entries):
        groups.setdefault(len(entry.images), []).append(i)
    for members in groups.values():
        own = [dataset.entries[i].images for i in members]
        if len(set(own)) < 2:
            continue
        new = list(own)
        rng.shuffle(new)
        for _ in range(10):  # repair positions that drew their own image by swapping with a compatible one
            clashes = [j for j in range(len(new)) if new[j] == own[j]]
            if not clashes:
                break
            for j in clashes:
                m = rng.randrange(len(new))
                if new[m] != own[j] and new[j] != own[m]:
                    new[j], new[m] = new[m], new[j]
        for j, i in enumerate(members):
            dataset.entries[i].images = new[j]


@torch.no_grad()
def predict_logits(
    model: Any, dataset: QualityDataset, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs ``[N, num_labels]`` and labels ``[N]`` of every entry, in order."""
    collate = Collator(dataset.processor.tokenizer.pad_token_id, float_labels=True)
    model.eval()
    logits, labels = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = collate(items)
        label = batch.pop("labels")
        logits.append(model(**batch).logits.float().cpu().numpy())
        labels.append(label.numpy())
    return np.concatenate(logits), np.concatenate(labels).round().astype(np.int64)


def validation_scores(
    checkpoint: str | os.PathLike[str], data_path: str | os.PathLike[str], batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Continuous scores (:func:`~unifilter_core.training.metrics.scores_of`) and true levels of every pair of a
    validation JSON, scored by ``checkpoint``."""
    logits, labels = _predict(checkpoint, data_path, None, batch_size=batch_size)
    return scores_of(logits), np.asarray(labels).astype(np.int64)


def _predict(
    checkpoint: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None,
    *,
    shuffle_images: bool = False,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    from unifilter_core.modeling import UniFilterForQualityScoring
    from unifilter_core.training.config import Stage2Config
    from unifilter_core.training.stage2 import make_dataset, make_processor

    model = UniFilterForQualityScoring.from_pretrained(str(checkpoint), torch_dtype=torch.float32)
    config = Stage2Config(
        model_path=str(checkpoint), output_dir="-", data_path="-", eval_data_path=str(data_path),
        eval_image_folder=str(image_folder) if image_folder else None,
    )  # fmt: skip
    processor = make_processor(model, str(checkpoint), config)
    dataset = make_dataset(processor, config, train=False, cache_images=processor.config.image_size <= 64)
    if shuffle_images:
        shuffle_dataset_images(dataset, seed)
    with torch.inference_mode():
        return predict_logits(model, dataset, batch_size)


def evaluate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data_path: str | os.PathLike[str],
    image_folder: str | os.PathLike[str] | None = None,
    *,
    shuffle_images: bool = False,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Metrics of a checkpoint on a UniFilter-format JSON (see ``metrics.classification_report``).

    Args:
        checkpoint: a classifier folder in the released layout.
        data_path: validation JSON; image_folder: its image folder (default: the JSON's folder).
        shuffle_images: give each sample another sample's image(s) first.
        seed: seed of the shuffle.
        batch_size: samples per forward.
    """
    logits, labels = _predict(
        checkpoint, data_path, image_folder, shuffle_images=shuffle_images, seed=seed, batch_size=batch_size
    )
    report = classification_report(logits, labels)
    report["shuffled_images"] = shuffle_images
    return report
