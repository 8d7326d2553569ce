"""Atomic writers: the filtered webdataset tar and JSON manifests.

Every file is written to a hidden temporary file in the destination folder, flushed and fsynced, then renamed
into place (``os.replace``) and the folder fsynced, so a crash leaves either the previous file or the complete
new one, never a partial file under the final name (at worst a ``.<name>.*.tmp`` file, which readers ignore).
The write itself is :func:`unifilter_core.fileio.atomic_file`; this module adds the output lock and stale-temp cleanup.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock, Timeout

from unifilter_core import storage
from unifilter_core.data.limits import ReaderLimits
from unifilter_core.data.tars import is_unsafe_member_name, iter_raw_samples, split_key
from unifilter_core.fileio import atomic_file, atomic_write_bytes  # both also imported from here
from unifilter_core.records import Reason

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class FilteredTarSummary:
    """What :func:`write_filtered_tar` did. ``kept + dropped + unsafe`` equals the reader's row count.

    Attributes:
        kept: samples written (each with all its original members).
        dropped: rows not written: keys not in ``keep_keys``, and rows the reader flagged (truncated, duplicate,
            oversized...) even when their key was in ``keep_keys``.
        unsafe: rows for members whose names are absolute or contain ``..`` (never written).
        failed_kept: of ``dropped``, rows whose key was in ``keep_keys`` but that the reader flagged.
        missing: keys of ``keep_keys`` that the tar does not contain.
        members_written: tar members written.
        source_incomplete: the source tar was truncated or partly unreadable.
    """

    kept: int = 0
    dropped: int = 0
    unsafe: int = 0
    failed_kept: int = 0
    missing: int = 0
    members_written: int = 0
    source_incomplete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_destination(out_path: str | os.PathLike[str]) -> Path:
    out = Path(out_path)
    if out.name in ("", ".", ".."):
        raise ValueError(f"output path {str(out_path)!r} must name a file")
    out = out.parent.resolve() / out.name
    if out.is_dir():
        raise ValueError(f"output path {out} is a directory; give the file to write, e.g. {out}/00000000.tar")
    return out


@contextlib.contextmanager
def exclusive_lock(lock_path: str | os.PathLike[str], holder: str) -> Iterator[None]:
    """Hold an exclusive ``filelock`` on ``lock_path`` (created when missing) for the block, across processes.

    When another process holds it, logs "waiting for <holder>" once and blocks until it is free. The lock file
    is removed while still held, so no lock files pile up next to the outputs: a process that was waiting on
    the removed file notices (``filelock`` checks the link count after locking) and locks a fresh one.

    Raises:
        OSError: the lock file cannot be created (read-only folder, permissions).
    """
    path = Path(lock_path)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("waiting for %s (lock %s)", holder, path)
        lock.acquire()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        lock.release()


STALE_TEMP_SECONDS = 600.0


def remove_stale_temp_files(
    out_path: str | os.PathLike[str], older_than_s: float = STALE_TEMP_SECONDS
) -> int:
    """Delete ``.<name>.*.tmp`` files a killed writer of ``out_path`` left behind.

    Only temporaries untouched for ``older_than_s`` seconds are removed, so a writer still running (its file's
    mtime moves as it writes) is not disturbed; ``older_than_s=0`` (everything) is only safe while holding the
    output's lock (``atomic_output(..., lock=True)``). Returns how many were removed.
    """
    out = Path(out_path)
    if not out.parent.is_dir():
        return 0
    removed = 0
    cutoff = time.time() - older_than_s
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if tmp.is_file() and (older_than_s <= 0 or tmp.stat().st_mtime < cutoff):
                tmp.unlink()
                removed += 1
                logger.info("removed stale temporary file %s", tmp)
    return removed


def lock_path_for(out_path: str | os.PathLike[str]) -> Path:
    """The hidden lock file of an output: ``00000001.tar`` -> ``.00000001.tar.lock`` (same folder)."""
    out = Path(out_path)
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def atomic_output(out_path: str | os.PathLike[str], *, lock: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file next to ``out_path``; on success fsync it and rename it to ``out_path``.

    The parent folder is created if needed. On an exception the temporary file is removed and the exception
    propagates; ``out_path`` is untouched.

    Args:
        out_path: the file to write.
        lock: hold the output's lock (:func:`lock_path_for`) for the whole write, so writers of one output run
            one at a time; every temporary file of the output found under the lock is stale and removed. Without
            it only temporaries untouched for :data:`STALE_TEMP_SECONDS` are removed.

    Raises:
        ValueError: when ``out_path`` is a directory or names no file.
    """
    out = _check_destination(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if lock:
            stack.enter_context(exclusive_lock(lock_path_for(out), f"another writer of {out}"))
        remove_stale_temp_files(out, older_than_s=0.0 if lock else STALE_TEMP_SECONDS)
        yield stack.enter_context(atomic_file(out))


def write_manifest_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as indented, key-sorted JSON, atomically.

    Raises:
        TypeError / ValueError: when ``data`` is not JSON-serialisable (or holds NaN); nothing is written then.
    """
    text = json.dumps(data, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    """A plain-file header: original name and mtime; mode 0644 and no owner (nothing setuid from strangers)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_filtered_tar(
    src_tar: str | os.PathLike[str],
    keep_keys: set[str],
    out_path: str | os.PathLike[str],
    *,
    limits: ReaderLimits | None = None,
) -> FilteredTarSummary:
    """Copy the samples of ``src_tar`` whose key is in ``keep_keys`` into a new webdataset tar, atomically.

    Members are copied byte for byte with their original names, in source order, so stock ``webdataset`` and
    ``tar`` read the result. Rows the reader flags are never written (a duplicate key keeps only its first
    occurrence; a truncated sample is left out), nor is any member whose name is absolute or contains ``..``.
    The output is one file: a temporary file in ``out_path``'s folder, fsynced and renamed into place.

    Args:
        src_tar: the source tar (local, or a store URL read as a stream).
        keep_keys: the ``__key__`` values to keep.
        out_path: the tar file to write (its folder is created if needed).
        limits: reader limits (``max_member_bytes``); use the ones the scoring run used.

    Returns:
        Counts of what was kept, dropped and refused.

    Raises:
        ValueError: when ``out_path`` is a directory or the source tar itself.
    """
    src = src_tar if storage.is_url(src_tar) else Path(src_tar).resolve()
    out = _check_destination(out_path)
    if not storage.is_url(src) and out == src:
        raise ValueError(f"output {out} is the source tar; write the filtered tar elsewhere")
    summary = FilteredTarSummary()
    written: set[str] = set()
    seen: set[str] = set()
    with (
        atomic_output(
            out, lock=True
        ) as handle,  # a second writer of `out` waits; stale temps go under the lock
        tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for raw in iter_raw_samples(src, limits=limits):
            failure = raw.failure
            if failure is not None and failure.reason == Reason.UNSAFE_MEMBER_NAME:
                summary.unsafe += 1
                continue
            seen.add(raw.key)
            if failure is not None and failure.reason in (Reason.TAR_TRUNCATED, Reason.TAR_READ_ERROR):
                summary.source_incomplete = True
            if raw.key not in keep_keys or failure is not None or raw.key in written:
                summary.dropped += 1
                summary.failed_kept += int(raw.key in keep_keys and failure is not None)
                continue
            for name, mtime in zip(raw.member_names, raw.member_mtimes, strict=True):
                data = raw.members[split_key(name)[1] or ""]
                if is_unsafe_member_name(name):  # defence in depth: the reader never groups these
                    raise AssertionError(f"unsafe member name {name!r} reached the writer")
                tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
                summary.members_written += 1
            written.add(raw.key)
            summary.kept += 1
    summary.missing = len(keep_keys - seen)
    logger.info("filtered %s -> %s: %s", src, out, summary)
    return summary
