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
import signal
import traceback
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unifilter_core.data import decode_caption, decode_document, iter_raw_samples
from unifilter_core.processing import PreparedSample
from unifilter_core.records import Reason, SampleFailure, ScoreResult
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
        flags: :class:`~unifilter_core.records.Flag` codes the reader, decoder or processor set (row ``flags``).
    """

    index: int
    key: str
    uid: str | None
    url: str | None
    prepared: PreparedSample | None
    failure: ScoreResult | None
    flags: list[str] = field(default_factory=list)

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
    """Worker loop: for each ``(task_id, tar_path, kind, first_chunk)`` task, send its chunks, then ``done``.

    An exception outside the per-sample isolation (the tar reader itself) is reported as ``error``.
    """
    torch.set_num_threads(1)
    while True:
        task = _next_task(tasks)
        if task is None:
            return
        task_id, tar_path, kind, first_chunk = task
        try:
            buffer: list[SampleItem] = []
            shard = (worker_id, num_workers, chunk, first_chunk)
            for item in iter_items(tar_path, SampleKind(kind), processor, limits, shard=shard):
                buffer.append(_to_wire(item))
                if len(buffer) == chunk:
                    _put(results, (task_id, "items", buffer))
                    buffer = []
            if buffer:
                _put(results, (task_id, "items", buffer))
            _put(results, (task_id, "done", None))
        except Exception:  # not bad data (bad data is a row): the consumer retries the chunk sample by sample
            _put(results, (task_id, "error", traceback.format_exc()))


def _retry_main(conn: Any, tar_path: str, kind: str, index: int, processor: Any, limits: Any) -> None:
    """Prepare sample ``index`` alone: send ``key``, then ``item`` / ``error``; ``end`` when the tar is shorter.

    ``reader_error`` means the tar could not be read up to the sample (not the sample's fault).
    """
    torch.set_num_threads(1)
    reached = False
    try:
        for i, raw in enumerate(iter_raw_samples(tar_path, limits=limits)):
            if i == index:
                reached = True
                conn.send(("key", str(raw.key) if getattr(raw, "key", None) else f"__sample_{index}__"))
                conn.send(("item", _to_wire(prepare_item(i, raw, SampleKind(kind), processor, limits))))
                return
        conn.send(("end", None))
    except Exception as exc:
        conn.send(("error" if reached else "reader_error", short_error(exc)))
    finally:
        conn.close()


def describe_exit(exitcode: int | None) -> str:
    """``exit code 9`` / ``killed by signal SIGKILL`` for a process's ``exitcode``."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class WorkerCrashed(RuntimeError):
    """The tar cannot be read to its end (the reader itself fails or dies); its table is not written.

    A decode worker that dies or raises on a *sample* never raises this: that chunk is retried sample by sample.
    """


class DecodePool:
    """Worker processes that decode + preprocess tars for the engine (kept alive across tars).

    Crash recovery: when a worker dies (``os._exit``, SIGKILL from the OOM killer, a segfault) or reports an
    exception, only the chunk the consumer waits for is lost. Its samples are retried one by one, each in a fresh
    process; a sample that kills that process too gets a ``worker_crash`` row (detail: exit code or signal). The
    workers then restart from the next chunk, so rows stay in tar order and the table stays complete.

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
        self.restarts = 0

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _context(self) -> Any:
        method = self._config.start_method
        if method == "auto":
            method = "spawn" if torch.cuda.is_initialized() else "fork"
        # workers tokenize one sample at a time; a forked Rust tokenizer must not use its thread pool
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return mp.get_context(method)

    def _start(self) -> None:
        ctx = self._context()
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
        logger.debug("started %d decode workers (%s)", n, ctx.get_start_method())

    def _get(self, w: int, task_id: int) -> tuple[str, Any]:
        """The next message of worker ``w`` for ``task_id``; ``("lost", why)`` when the worker died."""
        while True:
            try:
                got_id, kind, payload = self._results[w].get(timeout=self._config.worker_timeout_s)
            except queue.Empty:
                if self._procs[w].is_alive():
                    continue
                try:  # what it sent before dying is still in the pipe
                    got_id, kind, payload = self._results[w].get(timeout=0.1)
                except queue.Empty:
                    return "lost", f"died ({describe_exit(self._procs[w].exitcode)})"
            if got_id == task_id:
                return kind, payload

    def stream(self, tar_path: str | Path, kind: SampleKind) -> Iterator[SampleItem]:
        """The tar's samples in tar order. Abandoning the iterator early restarts the workers on next use.

        Raises:
            WorkerCrashed: the tar cannot be read past some point (not a single sample's fault).
        """
        first = 0
        finished = False
        try:
            while True:
                lost = yield from self._stream_from(tar_path, kind, first)
                if lost is None:
                    finished = True
                    return
                chunk_index, why = lost
                logger.warning(
                    "decode worker %s on chunk %d of %s; retrying its samples one by one",
                    why,
                    chunk_index,
                    Path(tar_path).name,
                )
                self.terminate()
                self.restarts += 1
                if (yield from self._retry_chunk(tar_path, kind, chunk_index)):
                    finished = True
                    return
                first = chunk_index + 1
        finally:
            if not finished:
                self.terminate()

    def _stream_from(
        self, tar_path: str | Path, kind: SampleKind, first: int
    ) -> Generator[SampleItem, None, tuple[int, str] | None]:
        """Chunks ``first, first + 1, ...`` from the workers; returns None at the end, else the lost chunk."""
        if not self._procs:
            self._start()
        task_id = self._next_task
        self._next_task += 1
        for tasks in self._tasks:
            tasks.put((task_id, str(tar_path), str(kind), first))
        n = len(self._procs)
        chunk_index = first
        while True:
            w = (chunk_index - first) % n
            msg, payload = self._get(w, task_id)
            if msg == "error":
                return chunk_index, f"{w} raised:\n{payload}"
            if msg == "lost":
                return chunk_index, f"{w} {payload}"
            if msg == "done":  # chunk `chunk_index` does not exist, so no later chunk does
                self._drain_others(w, task_id)
                return None
            for item in payload:
                yield _from_wire(item)
            chunk_index += 1

    def _drain_others(self, done_worker: int, task_id: int) -> None:
        for w in range(len(self._procs)):
            if w == done_worker:
                continue
            msg, payload = self._get(w, task_id)
            if msg == "items":
                raise WorkerCrashed(
                    f"decode worker {w} sent samples after the end of the tar (reader not deterministic?)"
                )
            if msg != "done":  # past the end of the tar: no sample is lost, but the pool must restart
                logger.warning("decode worker %d failed after the end of the tar: %s", w, payload)
                self.terminate()
                return

    def _retry_chunk(
        self, tar_path: str | Path, kind: SampleKind, chunk_index: int
    ) -> Generator[SampleItem, None, bool]:
        """Samples of one lost chunk, each prepared alone; returns True when the tar ended inside the chunk."""
        size = self._config.worker_chunk
        for index in range(chunk_index * size, (chunk_index + 1) * size):
            item = self._retry_alone(tar_path, kind, index)
            if item is None:
                return True
            yield item
        return False

    def _retry_alone(self, tar_path: str | Path, kind: SampleKind, index: int) -> SampleItem | None:
        """Prepare sample ``index`` in a fresh process: its item, a ``worker_crash`` row, or None past the end."""
        ctx = self._context()
        receiver, sender = ctx.Pipe(duplex=False)
        args = (sender, str(tar_path), str(kind), index, self._processor, self._config.reader_limits)
        proc = ctx.Process(target=_retry_main, args=args, name=f"unifilter-retry-{index}", daemon=True)
        proc.start()
        sender.close()
        key: str | None = None
        try:
            while True:
                try:
                    msg, payload = receiver.recv()
                except EOFError:  # the process is gone without an answer
                    break
                if msg == "key":
                    key = payload
                elif msg == "item":
                    return _from_wire(payload)
                elif msg == "end":
                    return None
                elif msg == "error":
                    return _error_item(index, key, Reason.INTERNAL_ERROR, payload)
                else:
                    raise WorkerCrashed(f"reading {tar_path} failed before sample {index}: {payload}")
        finally:
            receiver.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        exit_text = describe_exit(proc.exitcode)
        if key is None:
            raise WorkerCrashed(
                f"a process reading {tar_path} died before reaching sample {index} ({exit_text})"
            )
        logger.error("sample %d (%r) of %s kills its decode process (%s)", index, key, tar_path, exit_text)
        detail = f"the decode worker died on this sample, also when retried alone ({exit_text})"
        return _error_item(index, key, Reason.WORKER_CRASH, detail)

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


def _error_item(index: int, key: str | None, reason: Reason, detail: str) -> SampleItem:
    return SampleItem(
        index, key or f"__sample_{index}__", None, None, None, ScoreResult.failed(reason, detail)
    )
