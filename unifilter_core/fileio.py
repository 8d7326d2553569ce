"""Small file I/O helpers: atomic writes, directory fsync and file hashes (standard library only).

An atomic write goes to a temporary file in the destination folder, is flushed and fsynced, renamed over the
final name (``os.replace``) and the folder is fsynced, so a crash leaves either the previous file or the complete
new one, never a partial file under the final name. The default temporary name is ``.<name>.<random>.tmp``
(what :func:`unifilter_core.data.writer.remove_stale_temp_files` cleans up); callers whose cleanup relies on
another pattern pass their own ``temp`` path.

Directory fsync: some filesystems refuse ``fsync`` on a directory (``EINVAL`` / ``ENOTSUP``); only that is
ignored (the rename itself already happened and is atomic). Windows cannot open directories, so there it is
skipped. Every other error propagates.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

#: errno values meaning "this filesystem does not support fsync on a directory"; only these are ignored.
DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})

HASH_CHUNK = 1 << 20


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync ``folder`` so a rename in it is durable (see the module docstring for what is ignored)."""
    if os.name == "nt":  # directories cannot be opened there
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in DIR_FSYNC_UNSUPPORTED:
            raise
        logger.debug("fsync of directory %s not supported: %s", folder, exc)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """fsync an already written (and closed) file by path."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def commit_temp(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Make a finished temporary file the final one: fsync ``tmp``, rename it over ``final``, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str],
    *,
    temp: str | os.PathLike[str] | None = None,
    mode: int | None = None,
    durable: bool = True,
) -> Iterator[BinaryIO]:
    """Yield a binary handle on a temporary file next to ``path``; on success it replaces ``path``.

    The parent folder is created if needed. On an exception the temporary file is removed and the exception
    propagates; ``path`` is untouched.

    Args:
        path: the file to write.
        temp: the temporary file to use (created exclusively); default ``.<name>.<random>.tmp`` in the folder.
        mode: permission bits given to the file before the rename (the default temporary file is ``0600``).
        durable: fsync the file and the folder (``False`` keeps atomicity but not durability, for bulk copies).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if temp is None:
        fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
        tmp = Path(name)
        handle: BinaryIO = os.fdopen(fd, "wb")
    else:
        tmp = Path(temp)
        handle = open(tmp, "xb")  # noqa: SIM115 - closed below, before the rename
    try:
        with handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`); returns ``path`` as a :class:`Path`."""
    with atomic_file(path, mode=mode) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = HASH_CHUNK) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks (constant memory)."""
    with open(path, "rb") as handle:
        return sha256_stream(handle, chunk_size)


def sha256_stream(handle: BinaryIO, chunk_size: int = HASH_CHUNK) -> str:
    """The sha256 hex digest of what ``handle`` reads to its end, in chunks (constant memory)."""
    digest = hashlib.sha256()
    while chunk := handle.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()
