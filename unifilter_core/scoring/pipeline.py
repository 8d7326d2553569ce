"""Turning a tar into an ordered stream of model-ready samples, in worker processes or in-process.

Worker ``w`` of ``W`` reads the tar itself and decodes + preprocesses the chunks ``w, w + W, w + 2W, ...`` (chunks
of ``worker_chunk`` consecutive samples); the consumer takes chunks round-robin, which restores tar order without
any re-ordering buffer. Every worker output queue is bounded, so the workers run ahead of the model by a bounded
number of samples and memory does not grow with the tar size. Reading the tar in every worker costs little (the
bytes come from the page cache); decoding and preprocessing, the expensive part, is split.

Tensors cross the process boundary as numpy arrays (plain pickled bytes, no shared-memory file descriptors).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unifilter_core.data import decode_caption, decode_document, iter_raw_samples
from unifilter_core.processing import PreparedSample
from unifilter_core.records import SampleFailure, ScoreResult
from unifilter_core.scoring.config import SampleKind, ScoringConfig

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
    """

    index: int
    key: str
    uid: str | None
    url: str | None
    prepared: PreparedSample | None
    failure: ScoreResult | None

    @property
    def pixel_bytes(self) -> int:
        pixels = self.prepared.pixel_values if self.prepared is not None else None
        return 0 if pixels is None else int(pixels.numel() * pixels.element_size())


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


def _failure_row(failure: SampleFailure) -> ScoreResult:
    return failure.to_result()


def prepare_item(index: int, raw: Any, kind: SampleKind, processor: Any, limits: Any) -> SampleItem:
    """Decode and preprocess one raw sample; bad data becomes a failure row, never an exception.

    Args:
        index: position of the sample in the tar.
        raw: a ``unifilter_core.data.RawSample``.
        kind: the tar layout.
        processor: a ``UniFilterProcessor``.
        limits: ``unifilter_core.data.ReaderLimits``.
    """
    key = str(raw.key) if getattr(raw, "key", None) else f"__sample_{index}__"
    if getattr(raw, "failure", None) is not None:
        uid, url = _ids_from_meta(getattr(raw.failure, "extra", None))
        return SampleItem(index, key, uid, url, None, _failure_row(raw.failure))
    decoded = decode_caption(raw, limits) if kind is SampleKind.CAPTION else decode_document(raw, limits)
    if isinstance(decoded, SampleFailure):
        uid, url = _ids_from_meta(decoded.extra)
        return SampleItem(index, key, uid, url, None, _failure_row(decoded))
    uid, url = _ids_from_meta(decoded.meta)
    if kind is SampleKind.CAPTION:
        prepared = processor.prepare_caption(decoded.image, decoded.text)
    else:
        prepared = processor.prepare_document(decoded.texts, decoded.images)
    if isinstance(prepared, SampleFailure):
        return SampleItem(index, key, uid, url, None, _failure_row(prepared))
    dropped = getattr(decoded, "dropped", None)
    if dropped:
        note = "; ".join(_describe_drop(d) for d in dropped)
        prepared.detail = note if not prepared.detail else f"{prepared.detail}; {note}"
    return SampleItem(index, key, uid, url, prepared, None)


def iter_items(
    tar_path: str | Path,
    kind: SampleKind,
    processor: Any,
    limits: Any,
    *,
    shard: tuple[int, int, int] | None = None,
) -> Iterator[SampleItem]:
    """Prepared samples of a tar in order (only chunks ``w, w + W, ...`` when ``shard = (w, W, chunk)``)."""
    for index, raw in enumerate(iter_raw_samples(tar_path, limits=limits)):
        if shard is not None and (index // shard[2]) % shard[1] != shard[0]:
            continue
        yield prepare_item(index, raw, kind, processor, limits)


# ------------------------------------------------------------------------------------------------ transport
def _to_wire(item: SampleItem) -> SampleItem:
    if item.prepared is not None and item.prepared.pixel_values is not None:
        item.prepared = dataclasses.replace(item.prepared, pixel_values=item.prepared.pixel_values.numpy())
    return item


def _from_wire(item: SampleItem) -> SampleItem:
    if item.prepared is not None and isinstance(item.prepared.pixel_values, np.ndarray):
        item.prepared.pixel_values = torch.from_numpy(item.prepared.pixel_values)
    return item


def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def _put(results: Any, message: tuple[Any, ...]) -> None:
    """Blocking put that gives up when the engine process has died (e.g. SIGKILL): no orphaned workers."""
    while True:
        try:
            results.put(message, timeout=1.0)
            return
        except queue.Full:
            if not _parent_alive():
                # exit at once: a normal exit would wait forever for the queue's feeder thread to flush
                os._exit(0)


def _next_task(tasks: Any) -> Any:
    while True:
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            if not _parent_alive():
                return None


def _worker_main(
    worker_id: int,
    num_workers: int,
    chunk: int,
    processor: Any,
    limits: Any,
    tasks: Any,
    results: Any,
) -> None:
    """Worker loop: for each ``(task_id, tar_path, kind)`` task, send its chunks, then ``done`` (or ``error``)."""
    torch.set_num_threads(1)
    while True:
        task = _next_task(tasks)
        if task is None:
            return
        task_id, tar_path, kind = task
        try:
            buffer: list[SampleItem] = []
            shard = (worker_id, num_workers, chunk)
            for item in iter_items(tar_path, SampleKind(kind), processor, limits, shard=shard):
                buffer.append(_to_wire(item))
                if len(buffer) == chunk:
                    _put(results, (task_id, "items", buffer))
                    buffer = []
            if buffer:
                _put(results, (task_id, "items", buffer))
            _put(results, (task_id, "done", None))
        except Exception:  # a bug, not bad data (bad data is a failure row): report it to the consumer
            _put(results, (task_id, "error", traceback.format_exc()))


class WorkerCrashed(RuntimeError):
    """A decode worker died or raised; the tar's table is not written."""


class DecodePool:
    """Worker processes that decode + preprocess tars for the engine (kept alive across tars).

    Args:
        processor: the scorer's ``UniFilterProcessor`` (pickled to each worker once).
        config: engine options (``num_workers`` >= 1, ``worker_chunk``, queue sizes, start method).
    """

    def __init__(self, processor: Any, config: ScoringConfig) -> None:
        if config.num_workers < 1:
            raise ValueError("DecodePool needs num_workers >= 1; use iter_items for in-process decoding")
        self._processor = processor
        self._config = config
        chunks_ahead = (
            config.worker_prefetch_windows * config.window_size / (config.num_workers * config.worker_chunk)
        )
        self._queue_size = max(2, int(chunks_ahead) + 1)
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: list[Any] = []
        self._next_task = 0

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> None:
        method = self._config.start_method
        if method == "auto":
            method = "spawn" if torch.cuda.is_initialized() else "fork"
        # workers tokenize one sample at a time; a forked Rust tokenizer must not use its thread pool
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = mp.get_context(method)
        n = self._config.num_workers
        self._tasks = [ctx.Queue() for _ in range(n)]
        self._results = [ctx.Queue(maxsize=self._queue_size) for _ in range(n)]
        self._procs = []
        for w in range(n):
            args = (w, n, self._config.worker_chunk, self._processor, self._config.reader_limits)
            proc = ctx.Process(
                target=_worker_main,
                args=(*args, self._tasks[w], self._results[w]),
                name=f"unifilter-decode-{w}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        logger.debug("started %d decode workers (%s)", n, method)

    def _get(self, w: int, task_id: int) -> tuple[str, Any]:
        while True:
            try:
                got_id, kind, payload = self._results[w].get(timeout=self._config.worker_timeout_s)
            except queue.Empty:
                if not self._procs[w].is_alive():
                    raise WorkerCrashed(
                        f"decode worker {w} died (exit code {self._procs[w].exitcode}); see its log above"
                    ) from None
                continue
            if got_id == task_id:
                return kind, payload

    def stream(self, tar_path: str | Path, kind: SampleKind) -> Iterator[SampleItem]:
        """The tar's samples in tar order. Abandoning the iterator early restarts the workers on next use."""
        if not self._procs:
            self._start()
        task_id = self._next_task
        self._next_task += 1
        for tasks in self._tasks:
            tasks.put((task_id, str(tar_path), str(kind)))
        n = len(self._procs)
        finished = False
        try:
            chunk_index = 0
            while True:
                w = chunk_index % n
                msg, payload = self._get(w, task_id)
                if msg == "error":
                    raise WorkerCrashed(f"decode worker {w} failed on {tar_path}:\n{payload}")
                if msg == "done":  # chunk `chunk_index` does not exist, so no later chunk does
                    for other in range(n):
                        if other != w:
                            self._drain(other, task_id)
                    break
                for item in payload:
                    yield _from_wire(item)
                chunk_index += 1
            finished = True
        finally:
            if not finished:
                self.terminate()

    def _drain(self, w: int, task_id: int) -> None:
        msg, payload = self._get(w, task_id)
        if msg == "error":
            raise WorkerCrashed(f"decode worker {w} failed:\n{payload}")
        if msg != "done":
            raise WorkerCrashed(
                f"decode worker {w} sent samples after the end of the tar (reader not deterministic?)"
            )

    def terminate(self) -> None:
        """Stop the workers now (used when a tar is abandoned half-way); the next stream() starts new ones."""
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=5)
        for q in (*self._tasks, *self._results):
            q.cancel_join_thread()
            q.close()
        self._procs, self._tasks, self._results = [], [], []

    def close(self) -> None:
        """Ask the workers to exit and wait for them."""
        if not self._procs:
            return
        for tasks in self._tasks:
            tasks.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
        self.terminate()
