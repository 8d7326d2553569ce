"""Training data: LLaVA-Pretrain JSON (stage 1) and UniFilter training JSON (stage 2) -> padded batches.

Records are tokenized once when a dataset is built, by the scorer's own functions (:mod:`unifilter_core.prepare`
and ``UniFilterProcessor.document_ids``, so there is no train/serve skew): stage-1 captions with
``prepare.caption_ids`` (the scorer's caption layout and limits); stage-2 one-image records as ``[BOS, ...text with
IMAGE_TOKEN_INDEX at the <image>..., EOS]`` cut like captions (``prepare.cap_and_fit``), the other records with
``document_ids`` (``max_text_tokens`` checked before the ``max_length`` fit, as the scorer). Images are decoded by
the readers' hardened decoder and preprocessed by the processor (``prepare.prepare_image``) on first use and
optionally cached (the world's small images fit in memory; released-scale data is read lazily). A record that
cannot be used (bad JSON fields, a missing, undecodable or too large image, too many images or tokens) becomes a
:class:`SampleFailure` in ``dataset.failures``: counted, logged and written to the run's report, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from unifilter_core.prepare import (
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    cap_and_fit,
    caption_ids,
    prepare_image,
    right_pad,
)
from unifilter_core.processing import UniFilterProcessor
from unifilter_core.records import Reason, SampleFailure

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the token loss skips


@dataclass(slots=True)
class Entry:
    """One usable training record.

    Attributes:
        input_ids: ids with ``IMAGE_TOKEN_INDEX`` sentinels, BOS first, EOS last.
        images: image paths (absolute) in sentinel order.
        label: quality level (stage 2; an int, or a float for a regression head) or 0 (stage 1, unused).
    """

    input_ids: list[int]
    images: tuple[str, ...]
    label: int | float = 0
    text_first_ids: list[int] | None = None  # a caption's ids with its image after the text (stage 2)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON list (or JSON Lines) of records.

    Raises:
        ValueError: the file is missing or does not hold a list of objects.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"training data {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not isinstance(data, list):
        raise ValueError(f"{file} must hold a JSON list of records (or JSON Lines)")
    return data


def _as_paths(value: Any) -> list[str] | None:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


class ImageStore:
    """Loads an image file, decodes and preprocesses it as scoring does (:func:`~unifilter_core.prepare.prepare_image`);
    optionally keeps the tensor.

    Args:
        processor: the processor whose cost check and ``preprocess_image`` (``[3, H, W]`` float32) apply.
        cache: keep every preprocessed tensor in memory (small images only).
    """

    def __init__(self, processor: UniFilterProcessor, cache: bool) -> None:
        self.processor = processor
        self.cache = cache
        self._tensors: dict[str, torch.Tensor] = {}

    def load(self, path: str) -> torch.Tensor | SampleFailure:
        """The ``[3, H, W]`` tensor of ``path``, or a failure (missing / undecodable / too large image)."""
        hit = self._tensors.get(path)
        if hit is not None:
            return hit
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return SampleFailure(Reason.MISSING_IMAGE, detail=f"{path}: {exc}")
        tensor = prepare_image(self.processor, data)
        if isinstance(tensor, SampleFailure):
            tensor.detail = f"{path}: {tensor.detail}"
            return tensor
        if self.cache:
            self._tensors[path] = tensor
        return tensor


class RecordDataset(Dataset):
    """Base of both stages' datasets: entries, failures and image loading.

    Args:
        processor: tokenizer + image preprocessing (the checkpoint's).
        cache_images: keep preprocessed images in memory and check every image when the dataset is built.
    """

    def __init__(self, processor: UniFilterProcessor, cache_images: bool) -> None:
        self.processor = processor
        self.images = ImageStore(processor, cache_images)
        self.entries: list[Entry] = []
        self.failures: list[tuple[int, SampleFailure]] = []
        self.n_truncated = 0

    def __len__(self) -> int:
        return len(self.entries)

    def _add(self, index: int, entry: Entry | SampleFailure) -> None:
        if isinstance(entry, SampleFailure):
            self.failures.append((index, entry))
            return
        if self.images.cache:
            for path in entry.images:
                loaded = self.images.load(path)
                if isinstance(loaded, SampleFailure):
                    self.failures.append((index, loaded))
                    return
        self.entries.append(entry)

    def lengths(self) -> list[int]:
        """Spliced sequence length of every entry (for length-grouped batching)."""
        return [self.processor.spliced_length(e.input_ids) for e in self.entries]

    def _finish(self, source: str) -> None:
        if self.failures:
            counts = Counter(f.reason.value for _, f in self.failures)
            logger.warning("%s: %d record(s) not usable: %s", source, len(self.failures), dict(counts))
        if not self.entries:
            raise ValueError(f"{source} has no usable record (failures: {self.failure_summary()})")
        logger.info("%s: %d records (%d truncated)", source, len(self.entries), self.n_truncated)

    def failure_summary(self) -> dict[str, Any]:
        """Counts by reason and the first few failures (for the run's report)."""
        counts = Counter(f.reason.value for _, f in self.failures)
        examples = [{"index": i, "reason": f.reason.value, "detail": f.detail} for i, f in self.failures[:20]]
        return {
            "n_records": len(self.entries) + len(self.failures),
            "n_failed": len(self.failures),
            "by_reason": dict(counts),
            "examples": examples,
        }

    def _pixels(self, paths: tuple[str, ...]) -> torch.Tensor | None:
        tensors = []
        for path in paths:
            loaded = self.images.load(path)
            if isinstance(loaded, SampleFailure):
                logger.warning("image failed while training, sample skipped: %s", loaded.detail)
                return None
            tensors.append(loaded)
        return torch.stack(tensors) if tensors else torch.empty(0)


def _image_folder(data_path: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None) -> Path:
    """The folder image paths are relative to: ``image_folder``, else ``images/`` next to the JSON when it exists
    (the layout of the world and of LLaVA-Pretrain), else the JSON's folder."""
    if image_folder:
        return Path(image_folder)
    parent = Path(data_path).parent
    return parent / "images" if (parent / "images").is_dir() else parent


def resolve_image_folder(
    data_path: str | os.PathLike[str], image_folder: str | os.PathLike[str] | None, first_image: str | None
) -> Path:
    """The folder a dataset's image paths are relative to, checked on its first image.

    As the original code: ``image_folder`` when given (``--image_folder``); else the JSON's folder. The one
    exception is this project's own synthetic layout (paths relative to ``images/`` beside the JSON), used only
    when the first image is there and not beside the JSON: an unrelated ``images/`` folder never redirects paths.

    Raises:
        ValueError: the first image is not where the paths point (the message names it and the fix).
    """
    parent = Path(data_path).parent
    if first_image is None or Path(first_image).is_absolute():
        return Path(image_folder) if image_folder else parent
    candidates = [Path(image_folder)] if image_folder else [parent, parent / "images"]
    for folder in candidates:
        if (folder / first_image).is_file():
            if folder != candidates[0]:
                logger.info(
                    "%s: image paths are relative to %s (the synthetic-pairs layout)", data_path, folder
                )
            return folder
    tried = " nor ".join(str(folder / first_image) for folder in candidates)
    raise ValueError(
        f"{data_path}: the first record's image {first_image!r} is not at {tried}; image paths are relative to "
        "image_folder (the original's --image_folder; default: the JSON's folder): pass the folder that holds them"
    )


def _first_image(records: list[Any]) -> str | None:
    for record in records:
        paths = _as_paths(record.get("image")) if isinstance(record, dict) else None
        if paths:
            return paths[0]
    return None


class CaptionPretrainDataset(RecordDataset):
    """LLaVA-Pretrain records (``{"id", "image", "conversations": [human, gpt]}``) for next-token training.

    Each record becomes ``[BOS, IMAGE, tokens("\\n" + caption)..., EOS]`` (the scorer's caption layout); the token
    labels are the ids with ``IGNORE_INDEX`` on BOS and the image sentinel (see :func:`token_labels`).
    """

    def __init__(
        self,
        processor: UniFilterProcessor,
        data_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] | None = None,
        *,
        caption_max_tokens: int | None = None,
        cache_images: bool = False,
    ) -> None:
        super().__init__(processor, cache_images)
        records = read_records(data_path)
        folder = resolve_image_folder(data_path, image_folder, _first_image(records))
        for i, record in enumerate(records):
            self._add(i, self._entry(record, folder, caption_max_tokens))
        self._finish(str(data_path))

    def _entry(self, record: Any, folder: Path, cap: int | None) -> Entry | SampleFailure:
        try:
            image = record["image"]
            turns = record["conversations"]
            caption = next(t["value"] for t in turns if t.get("from") == "gpt")
        except (KeyError, TypeError, StopIteration):
            return SampleFailure(Reason.INVALID_FIELDS, detail="need image and conversations with a gpt turn")
        if not isinstance(image, str) or not isinstance(caption, str):
            return SampleFailure(Reason.INVALID_FIELDS, detail="image and caption must be strings")
        ids, truncated = caption_ids(self.processor, caption, cap)
        self.n_truncated += truncated
        return Entry(ids, (str(folder / image),))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        pixels = self._pixels(entry.images)
        if pixels is None:
            return None
        return {
            "input_ids": entry.input_ids,
            "pixel_values": pixels,
            "token_labels": token_labels(entry.input_ids),
        }


def token_labels(input_ids: list[int]) -> list[int]:
    """Next-token targets of a caption sequence: the ids, with ``IGNORE_INDEX`` on BOS and image sentinels."""
    return [IGNORE_INDEX if (i == 0 or t == IMAGE_TOKEN_INDEX) else t for i, t in enumerate(input_ids)]


class QualityDataset(RecordDataset):
    """UniFilter training records (``{"image": path | [paths], "text": "...<image>...", "label": 0..3}``).

    Args:
        processor: the checkpoint's processor.
        data_path: the JSON file.
        image_folder: folder the image paths are relative to (default: the JSON's folder).
        caption_max_tokens / max_images / max_text_tokens: the scorer's limits.
        num_levels: labels must be integers in ``0..num_levels-1``.
        swap_negative_fraction: share of top-level samples served with another sample's image(s) and
            ``swap_negative_label`` (training only; fresh draw on each access).
        text_first_fraction: share of caption samples (one image, ``<image>`` first) served with the image after
            the caption, in the document layout (``caption\n\n<image>``), label unchanged (training only; fresh
            draw on each access): practice for documents whose descriptions come before their images.
        cache_images: see :class:`RecordDataset`.
        seed: seed of the swap and layout draws.
    """

    def __init__(
        self,
        processor: UniFilterProcessor,
        data_path: str | os.PathLike[str],
        image_folder: str | os.PathLike[str] | None = None,
        *,
        caption_max_tokens: int | None = 75,
        max_images: int | None = 10,
        max_text_tokens: int | None = 6000,
        num_levels: int = 4,
        swap_negative_fraction: float = 0.0,
        swap_negative_label: int = 1,
        text_first_fraction: float = 0.0,
        cache_images: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(processor, cache_images)
        if not 0 <= text_first_fraction <= 1:
            raise ValueError(f"text_first_fraction must be in [0, 1], got {text_first_fraction}")
        self.text_first_fraction = text_first_fraction
        records = read_records(data_path)
        folder = resolve_image_folder(data_path, image_folder, _first_image(records))
        self.num_levels = num_levels
        self.limits = (caption_max_tokens, max_images, max_text_tokens)
        for i, record in enumerate(records):
            self._add(i, self._entry(record, folder))
        self._finish(str(data_path))
        self.swap_fraction = swap_negative_fraction
        self.swap_label = swap_negative_label
        self._rng = random.Random(seed)
        self._by_count: dict[int, list[int]] = {}
        for i, entry in enumerate(self.entries):
            self._by_count.setdefault(len(entry.images), []).append(i)

    def _entry(self, record: Any, folder: Path) -> Entry | SampleFailure:
        cap, max_images, max_text = self.limits
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            return SampleFailure(Reason.INVALID_FIELDS, detail="record needs a string 'text'")
        label = record.get("label")
        if (
            isinstance(label, bool)
            or not isinstance(label, (int, float))
            or not math.isfinite(label)
            or not 0 <= label <= self.num_levels - 1
        ):
            return SampleFailure(
                Reason.INVALID_FIELDS,
                detail=f"label {label!r} is not a number in 0..{self.num_levels - 1} (an int for classification)",
            )
        paths = _as_paths(record.get("image"))
        if paths is None:
            return SampleFailure(Reason.INVALID_FIELDS, detail="'image' must be a path or a list of paths")
        text = record["text"]
        if text.count(IMAGE_TOKEN) != len(paths):
            return SampleFailure(
                Reason.IMAGE_COUNT_MISMATCH,
                detail=f"{text.count(IMAGE_TOKEN)} <image> markers, {len(paths)} images",
            )
        if max_images is not None and len(paths) > max_images:
            return SampleFailure(
                Reason.TOO_MANY_IMAGES, detail=f"{len(paths)} images > {max_images}", n_images=len(paths)
            )
        text_first = None
        if len(paths) == 1:  # caption layout: the caption limit, like the scorer's prepare_caption
            p = self.processor
            ids, truncated = cap_and_fit(p, [p.bos_id, *p.tokenize_with_images(text), p.eos_id], cap)
            kept = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
            if self.text_first_fraction > 0 and text.startswith(IMAGE_TOKEN) and kept == 1:
                caption = text[len(IMAGE_TOKEN) :].strip()
                built = self.processor.document_ids(f"{caption}\n\n{IMAGE_TOKEN}", max_text)
                if not isinstance(built, SampleFailure) and built[1] == 1:
                    text_first = built[0]
        else:  # like the scorer's prepare_document: max_text_tokens before the max_length fit
            built = self.processor.document_ids(text, max_text)
            if isinstance(built, SampleFailure):
                built.n_images = len(paths)
                return built
            ids, kept, truncated = built
        self.n_truncated += truncated
        return Entry(ids, tuple(str(folder / p) for p in paths[:kept]), label, text_first)

    def labels(self) -> list[int | float]:
        """Labels of the usable records, in order (floats only where the JSON had them: regression heads)."""
        return [e.label for e in self.entries]

    def _swap(self, index: int, entry: Entry) -> tuple[tuple[str, ...], int]:
        if self.swap_fraction <= 0 or entry.label != self.num_levels - 1 or not entry.images:
            return entry.images, entry.label
        if self._rng.random() >= self.swap_fraction:
            return entry.images, entry.label
        pool = self._by_count.get(len(entry.images), [])
        for _ in range(8):
            other = self.entries[self._rng.choice(pool)]
            if other.images != entry.images:
                return other.images, self.swap_label
        return entry.images, entry.label

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        images, label = self._swap(index, entry)
        pixels = self._pixels(images)
        if pixels is None:
            return None
        ids = entry.input_ids
        if entry.text_first_ids is not None and self._rng.random() < self.text_first_fraction:
            ids = entry.text_first_ids
        return {"input_ids": ids, "pixel_values": pixels, "labels": label}


@dataclass
class Collator:
    """Right-pads a list of items into a batch.

    Output: ``input_ids`` [B, T] long (pad id), ``attention_mask`` [B, T] (from lengths), ``pixel_values``
    [N_images, 3, H, W] in sentinel order row by row, and ``labels`` [B] (float for a 1-output head, long for
    classes) and/or ``token_labels`` [B, T] (IGNORE_INDEX on padding).

    Args:
        pad_token_id: id used for padding (never read: the mask comes from lengths).
        float_labels: labels as float32 (regression) instead of long (classes).
    """

    pad_token_id: int
    float_labels: bool = True

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
        items = [it for it in items if it is not None]
        if not items:
            raise ValueError("every sample of a batch failed to load; see the warnings above")
        ids, mask = right_pad([it["input_ids"] for it in items], self.pad_token_id)
        pixels = [it["pixel_values"] for it in items if it["pixel_values"].numel()]
        batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        if "labels" in items[0]:
            labels = [it["labels"] for it in items]
            if not self.float_labels:
                _check_class_labels(labels)
            dtype = torch.float32 if self.float_labels else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        if "token_labels" in items[0]:
            rows = [it["token_labels"] for it in items]
            batch["token_labels"], _ = right_pad(rows, IGNORE_INDEX, length=ids.shape[1])
        return batch


def _check_class_labels(labels: list[int | float]) -> None:
    """Classification heads (``num_labels >= 2``) train on class ids: a fractional label is a data error."""
    bad = [label for label in labels if float(label) != int(label)]
    if bad:
        raise ValueError(
            f"labels {bad[:5]} are not integers: a classification head (num_labels >= 2) needs class ids; float "
            "labels train a regression head (num_labels = 1)"
        )
