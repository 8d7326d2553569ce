"""Decode worker processes for the engine, and what happens when one of them dies.

Worker ``w`` of ``W`` reads the tar itself and decodes + preprocesses the chunks ``w, w + W, w + 2W, ...`` (chunks
of ``worker_chunk`` consecutive samples); the consumer takes chunks round-robin, which restores tar order without
any re-ordering buffer. Each worker's outbox is bounded, so the workers run ahead of the model by a bounded number
of samples and memory does not grow with the tar size. Reading the tar in every worker costs little (the bytes
come from the page cache); decoding and preprocessing, the expensive part, is split.

Each worker sends through its own pipe whose only write end lives in that worker, so a worker killed half-way
through a message (the OOM killer, SIGKILL) reads as end-of-file in the engine, never as a hang.

Crash recovery: when a worker dies or reports an exception, only the chunk the consumer waits for is lost. Its
samples are retried one by one, each in a fresh process; a sample that kills that process too gets a
``worker_crash`` row (detail: exit code or signal). The workers then restart from the next chunk, so rows stay
in tar order and the tar's table is complete. Orphaned workers exit when the engine process dies.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import traceback
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch

from unifilter_core.data import iter_raw_samples
from unifilter_core.paths import base_name
from unifilter_core.records import Reason, ScoreResult
from unifilter_core.scoring.config import SampleKind, ScoringConfig
from unifilter_core.scoring.samples import (
    SampleItem,
    from_wire,
    iter_items,
    prepare_item,
    short_error,
    to_wire,
)

logger = logging.getLogger(__name__)


class WorkerCrashed(RuntimeError):
    """The tar cannot be read to its end (the reader itself fails or dies); its table is not written.

    A decode worker that dies or raises on a *sample* never raises this: that chunk is retried sample by sample.
    """


def describe_exit(exitcode: int | None) -> str:
    """``exit code 9`` / ``killed by signal SIGKILL`` for a process's ``exitcode``."""
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


# ------------------------------------------------------------------------------------------------ worker side
def _parent_alive() -> bool:
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


class _Outbox:
    """A worker's bounded outbox: a thread writes its messages to the pipe while the worker prepares more."""

    def __init__(self, conn: Any, maxsize: int) -> None:
        self._conn = conn
        self._box: queue.Queue[Any] = queue.Queue(maxsize)
        self._broken = False
        threading.Thread(target=self._run, name="unifilter-outbox", daemon=True).start()

    def _run(self) -> None:
        while True:
            message = self._box.get()
            try:
                self._conn.send(message)
            except OSError:  # the engine closed its end (it died or gave the tar up)
                self._broken = True
                return

    def put(self, message: tuple[Any, ...]) -> None:
        """Blocking put that gives up when the engine process has died (e.g. SIGKILL): no orphaned workers."""
        while True:
            if self._broken and not _parent_alive():
                os._exit(0)
            try:
                self._box.put(message, timeout=1.0)
                return
            except queue.Full:
                if not _parent_alive():
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
    conn: Any,
    size: int,
) -> None:
    """Worker loop: for each ``(task_id, tar_path, kind, first_chunk)`` task, send its chunks, then ``done``.

    An exception outside the per-sample isolation (the tar reader itself) is reported as ``error``.
    """
    torch.set_num_threads(1)
    outbox = _Outbox(conn, size)
    while True:
        task = _next_task(tasks)
        if task is None:
            return
        task_id, tar_path, kind, first_chunk = task
        try:
            buffer: list[SampleItem] = []
            shard = (worker_id, num_workers, chunk, first_chunk)
            for item in iter_items(tar_path, SampleKind(kind), processor, limits, shard=shard):
                buffer.append(to_wire(item))
                if len(buffer) == chunk:
                    outbox.put((task_id, "items", buffer))
                    buffer = []
            if buffer:
                outbox.put((task_id, "items", buffer))
            outbox.put((task_id, "done", None))
        except Exception:  # not bad data (bad data is a row): the consumer retries the chunk sample by sample
            outbox.put((task_id, "error", traceback.format_exc()))


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
                conn.send(("item", to_wire(prepare_item(i, raw, SampleKind(kind), processor, limits))))
                return
        conn.send(("end", None))
    except Exception as exc:
        conn.send(("error" if reached else "reader_error", short_error(exc)))
    finally:
        conn.close()


def _error_item(index: int, key: str | None, reason: Reason, detail: str) -> SampleItem:
    return SampleItem(
        index, key or f"__sample_{index}__", None, None, None, ScoreResult.failed(reason, detail)
    )


# ------------------------------------------------------------------------------------------------ engine side
class DecodePool:
    """Worker processes that decode + preprocess tars for the engine (kept alive across tars).

    Args:
        processor: the scorer's ``UniFilterProcessor`` (pickled to each worker once).
        config: engine options (``num_workers`` >= 1, ``worker_chunk``, queue sizes, start method).

    Attributes:
        restarts: how often the workers were restarted after one died or raised (recorded in the manifest).
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
        self._tasks, self._results, self._procs = [], [], []
        for w in range(n):
            tasks = ctx.Queue()
            receiver, sender = ctx.Pipe(duplex=False)
            args = (w, n, self._config.worker_chunk, self._processor, self._config.reader_limits)
            proc = ctx.Process(
                target=_worker_main,
                args=(*args, tasks, sender, self._queue_size),
                name=f"unifilter-decode-{w}",
                daemon=True,
            )
            proc.start()
            sender.close()  # before the next fork: the worker holds the only write end of its pipe
            self._tasks.append(tasks)
            self._results.append(receiver)
            self._procs.append(proc)
        logger.debug("started %d decode workers (%s)", n, ctx.get_start_method())

    def _get(self, w: int, task_id: int) -> tuple[str, Any]:
        """The next message of worker ``w`` for ``task_id``; ``("lost", why)`` when the worker died."""
        conn = self._results[w]
        while True:
            try:
                if not conn.poll(self._config.worker_timeout_s):
                    if self._procs[w].is_alive():
                        continue
                    if not conn.poll(0.1):  # what it sent before dying is still in the pipe
                        return "lost", f"died ({describe_exit(self._procs[w].exitcode)})"
                got_id, kind, payload = conn.recv()
            except (EOFError, OSError):  # died, possibly half-way through a message
                self._procs[w].join(timeout=5)
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
                    base_name(tar_path),
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
                yield from_wire(item)
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
                    return from_wire(payload)
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
            if proc.is_alive():
                proc.kill()
                proc.join()
        for tasks in self._tasks:
            tasks.cancel_join_thread()
            tasks.close()
        for conn in self._results:
            conn.close()
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
