"""Turning raw tar samples into model-ready :class:`SampleItem` s, one sample isolated from the next.

:func:`prepare_item` never raises for a sample: bad data is a failure row, anything else an ``internal_error`` row.
:func:`iter_items` is the in-process stream (and what each decode worker of :mod:`.pool` runs on its chunks).
Tensors cross process boundaries as numpy arrays (:func:`to_wire` / :func:`from_wire`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unifilter_core.data import decode_caption, decode_document, iter_raw_samples
from unifilter_core.processing import PreparedSample
from unifilter_core.records import Reason, SampleFailure, ScoreResult
from unifilter_core.scoring.config import SampleKind

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SampleItem:
    """One sample of the tar on its way to the model.

    Attributes:
        index: position in the tar (0-based, over every sample the reader yields).
        key: the sample's ``__key__``.
        uid: ``uid`` of the sample json, if any.
        url: ``url`` of the sample json, if any.
        prepared: the model input, or None when the sample failed before the model.
        failure: the row of a failed sample (None when ``prepared`` is set).
        flags: :class:`~unifilter_core.records.Flag` codes the reader, decoder or processor set (row ``flags``).
        meta: the sample json of a decoded caption sample (escaped), for the original-form table; None for
            documents and for samples whose json could not be read.
    """

    index: int
    key: str
    uid: str | None
    url: str | None
    prepared: PreparedSample | None
    failure: ScoreResult | None
    flags: list[str] = field(default_factory=list)
    meta: dict[str, Any] | None = None

    @property
    def pixel_bytes(self) -> int:
        pixels = self.prepared.pixel_values if self.prepared is not None else None
        return 0 if pixels is None else int(pixels.numel() * pixels.element_size())

    def add_flags(self, source: Any) -> None:
        """Merge the ``flags`` of ``source`` (a raw/decoded sample or a failure; absent = none) into the item."""
        for flag in getattr(source, "flags", None) or ():
            if str(flag) not in self.flags:
                self.flags.append(str(flag))


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _ids_from_meta(meta: Any) -> tuple[str | None, str | None]:
    if not isinstance(meta, dict):
        return None, None
    return _str_or_none(meta.get("uid")), _str_or_none(meta.get("url"))


def _describe_drop(drop: Any) -> str:
    if isinstance(drop, tuple) and len(drop) == 2:
        return f"slot {drop[0]}: image dropped by the reader ({drop[1]})"
    return f"reader dropped {drop}"


MAX_ERROR_DETAIL = 300


def short_error(exc: BaseException) -> str:
    """``"<ExceptionType>: <message>"`` cut to :data:`MAX_ERROR_DETAIL` characters (the row's ``detail``)."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= MAX_ERROR_DETAIL else text[: MAX_ERROR_DETAIL - 3] + "..."


def _fail(item: SampleItem, failure: SampleFailure) -> None:
    item.uid, item.url = _ids_from_meta(failure.extra)
    item.add_flags(failure)
    item.failure = failure.to_result()


def _decode_and_prepare(item: SampleItem, raw: Any, kind: SampleKind, processor: Any, limits: Any) -> None:
    """Fill ``item`` (ids, flags, then ``prepared`` or ``failure``); may raise on a bug or a hostile sample."""
    if getattr(raw, "failure", None) is not None:
        _fail(item, raw.failure)
        return
    decoded = decode_caption(raw, limits) if kind is SampleKind.CAPTION else decode_document(raw, limits)
    if isinstance(decoded, SampleFailure):
        _fail(item, decoded)
        return
    item.uid, item.url = _ids_from_meta(decoded.meta)
    item.add_flags(decoded)
    if kind is SampleKind.CAPTION:
        item.meta = decoded.meta or None
        prepared = processor.prepare_caption(decoded.image, decoded.text)
    else:
        prepared = processor.prepare_document(decoded.texts, decoded.images)
    item.add_flags(prepared)
    if isinstance(prepared, SampleFailure):
        item.failure = prepared.to_result()
        return
    dropped = getattr(decoded, "dropped", None)
    if dropped:
        note = "; ".join(_describe_drop(d) for d in dropped)
        prepared.detail = note if not prepared.detail else f"{prepared.detail}; {note}"
    item.prepared = prepared


def prepare_item(index: int, raw: Any, kind: SampleKind, processor: Any, limits: Any) -> SampleItem:
    """Decode and preprocess one raw sample; whatever goes wrong becomes that sample's row, never an exception.

    Bad data becomes a failure row with its reason code. Any other exception raised while decoding,
    preprocessing or tokenizing the sample (a bug, ``MemoryError``, ``RecursionError``, a tokenizer's
    ``UnicodeEncodeError``...) becomes an ``internal_error`` row whose detail is the exception type and message.
    ``KeyboardInterrupt`` and ``SystemExit`` still propagate.

    Args:
        index: position of the sample in the tar.
        raw: a ``unifilter_core.data.RawSample``.
        kind: the tar layout.
        processor: a ``UniFilterProcessor``.
        limits: ``unifilter_core.data.ReaderLimits``.
    """
    key = str(raw.key) if getattr(raw, "key", None) else f"__sample_{index}__"
    item = SampleItem(index, key, None, None, None, None)
    item.add_flags(raw)
    try:
        _decode_and_prepare(item, raw, kind, processor, limits)
    except Exception as exc:  # one sample never costs its tar: the exception becomes the sample's row
        logger.warning("sample %d (%r) raised while being prepared: %s", index, key, short_error(exc))
        logger.debug("traceback of sample %r", key, exc_info=True)
        item.prepared = None
        item.failure = ScoreResult.failed(Reason.INTERNAL_ERROR, short_error(exc))
    return item


def in_shard(index: int, shard: tuple[int, int, int, int] | None) -> bool:
    """Whether sample ``index`` belongs to ``shard = (worker, workers, chunk, first_chunk)`` (None = all)."""
    if shard is None:
        return True
    worker, workers, chunk, first = shard
    position = index // chunk
    return position >= first and (position - first) % workers == worker


def iter_items(
    tar_path: str | Path,
    kind: SampleKind,
    processor: Any,
    limits: Any,
    *,
    shard: tuple[int, int, int, int] | None = None,
) -> Iterator[SampleItem]:
    """Prepared samples of a tar in order.

    With ``shard = (w, W, chunk, first)`` only the chunks ``first + w, first + w + W, ...`` (chunks of ``chunk``
    consecutive samples) are prepared; the other samples are read but not decoded.
    """
    for index, raw in enumerate(iter_raw_samples(tar_path, limits=limits)):
        if in_shard(index, shard):
            yield prepare_item(index, raw, kind, processor, limits)


# ------------------------------------------------------------------------------------------------ transport
def to_wire(item: SampleItem) -> SampleItem:
    if item.prepared is not None and item.prepared.pixel_values is not None:
        item.prepared = dataclasses.replace(item.prepared, pixel_values=item.prepared.pixel_values.numpy())
    return item


def from_wire(item: SampleItem) -> SampleItem:
    if item.prepared is not None and isinstance(item.prepared.pixel_values, np.ndarray):
        item.prepared.pixel_values = torch.from_numpy(item.prepared.pixel_values)
    return item
