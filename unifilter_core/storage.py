"""Where data lives: a local path or an object-store URL (``s3://``, ``gs://``, ``hf://`` ... through fsspec).

Local paths stay :class:`pathlib.Path`; a URL becomes a :class:`upath.UPath` (pathlib's interface over fsspec),
so ``.name``, ``.parent``, ``/``, ``.exists()``, ``.open()`` work on both. What differs is written here once:

* **Reading** (:func:`open_input`): a store object is streamed (no copy to disk) through
  :class:`RetryingReader`, which reopens the object at the offset it reached after a transient store error,
  with exponential backoff; a missing object or a refused credential is not retried.
* **Identity** (:func:`object_fingerprint`): an object is identified by its ETag (or the store's checksum) and
  size, read from the listing, not by hashing its bytes again.
* **Committing without rename** (:func:`publish`): a store has no atomic rename, so a table is made visible
  in three steps: its old manifest is deleted, the data is uploaded, the manifest is uploaded last. A reader
  trusts a table only with its manifest (and only when the manifest's byte count matches the data), so a run
  killed at any point never leaves a table that looks complete.

Credentials and endpoints come only from the environment the filesystem library reads (for S3 the standard
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL``, ``AWS_REGION``);
nothing here takes them as arguments, and URLs, manifests and logs never carry them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*)://")
#: read size of store objects: large enough that a tar is a few requests, small enough to bound memory
BLOCK_SIZE = 8 << 20
#: attempts per read (first try included) and the first backoff in seconds (doubled each time, 10 s at most)
READ_ATTEMPTS = 6
FIRST_BACKOFF_S = 0.5

Location = Any  # pathlib.Path for local files, upath.UPath for URLs (UPath has no __fspath__ for remote ones)


def is_url(path: Any) -> bool:
    """True for an fsspec URL other than ``file://`` (``s3://bucket/key``, ``gs://...``, ``memory://...``)."""
    if isinstance(path, Path):
        return False
    match = _URL.match(str(path))
    return bool(match) and match.group(1).lower() not in ("file", "local")


def location(path: str | os.PathLike[str] | Any) -> Location:
    """``path`` as a :class:`~pathlib.Path` (local, ``~`` expanded) or a :class:`upath.UPath` (a URL, without a
    trailing slash: ``s3://b/scores/`` and ``s3://b/scores`` are one folder).

    Raises:
        ValueError: a URL whose protocol has no fsspec filesystem installed (with the pip package to add).
    """
    if not is_url(path):
        text = str(path)
        if text.startswith("file://"):
            text = text[len("file://") :]
        return Path(text).expanduser() if not isinstance(path, Path) else path
    if not isinstance(path, str) and type(path).__module__.startswith("upath"):
        return path
    from upath import UPath

    try:
        return UPath(str(path).rstrip("/"))
    except (ImportError, ValueError) as exc:
        raise ValueError(
            f"cannot open {path!r}: {exc} (install the filesystem package, e.g. s3fs or gcsfs)"
        ) from None


def resolved(path: Any) -> Location:
    """A folder the user named: a local path expanded and resolved, a URL as given."""
    loc = location(path)
    return loc if is_url(loc) else loc.resolve()


def absolute(path: Any) -> Location:
    """A local path made absolute without resolving the file itself (a symlinked shard keeps its name); a URL
    as it is."""
    loc = location(path)
    if is_url(loc):
        return loc
    return Path(os.path.abspath(loc))


def join(folder: Any, name: str) -> Location:
    """``folder / name`` for either kind of location."""
    return location(folder) / name


def forget_listings(path: Any) -> None:
    """Drop the filesystem's cached listings under a URL (fsspec caches them per process), so the next listing
    sees what other processes wrote; nothing for a local path."""
    loc = location(path)
    if is_url(loc):
        loc.fs.invalidate_cache(loc.path)


# ---------------------------------------------------------------------------------------------- reading
def is_transient(exc: BaseException) -> bool:
    """Whether a store error is worth retrying: not a missing object, a refused credential or a bad request."""
    if isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError)
    ):
        return False
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ClientError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "EndpointConnectionError",
        "ResponseStreamingError",
    )


class RetryingReader(io.RawIOBase):
    """A forward or seekable binary reader over ``open_at(offset)`` that survives transient store errors.

    On a transient error (see :func:`is_transient`) the underlying file is closed and reopened at the offset
    already handed out, after ``backoff`` seconds (doubling, at most 10 s); after ``attempts`` failures in a row
    the last error propagates (the tar reader records it as ``tar_read_error``).

    Args:
        open_at: opens the object and returns a binary file positioned at the given offset.
        name: the object's name, for log messages.
        attempts: tries per read, the first included.
        backoff: first wait in seconds.
        sleep: the wait function (tests pass a recorder).
    """

    def __init__(
        self,
        open_at: Callable[[int], BinaryIO],
        name: str,
        *,
        attempts: int = READ_ATTEMPTS,
        backoff: float = FIRST_BACKOFF_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__()
        self._open_at, self.name = open_at, name
        self._attempts, self._backoff, self._sleep = max(1, attempts), backoff, sleep
        self._pos = 0
        self._file: BinaryIO | None = None
        self.retries = 0  # transient errors survived, for tests and logs

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            offset += self._size()
        if offset < 0:
            raise ValueError(f"negative seek position {offset}")
        if offset != self._pos and self._file is not None:
            try:
                self._file.seek(offset)
            except Exception:  # a stream that cannot seek: reopen at the new offset on the next read
                self._drop()
        self._pos = offset
        return offset

    def _size(self) -> int:
        return self._call(lambda f: f.seek(0, io.SEEK_END), restore=True)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._call(lambda f: f.read(len(view)))
        n = len(data)
        view[:n] = data
        self._pos += n
        return n

    def _call(self, op: Callable[[BinaryIO], Any], *, restore: bool = False) -> Any:
        wait = self._backoff
        for attempt in range(1, self._attempts + 1):
            try:
                if self._file is None:
                    self._file = self._open_at(self._pos)
                result = op(self._file)
                if restore:
                    self._file.seek(self._pos)
                return result
            except Exception as exc:
                if not is_transient(exc) or attempt == self._attempts:
                    raise
                self.retries += 1
                logger.warning(
                    "reading %s at byte %d failed (%s: %s); retry %d of %d in %.1f s",
                    self.name, self._pos, type(exc).__name__, exc, attempt, self._attempts - 1, wait,
                )  # fmt: skip
                self._drop()
                self._sleep(wait)
                wait = min(wait * 2, 10.0)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # the connection is already broken; the next read reopens
                logger.debug("closing %s after an error failed", self.name, exc_info=True)
            self._file = None

    def close(self) -> None:
        self._drop()
        super().close()


def open_input(path: Any) -> BinaryIO:
    """Open a tar (or any input) for reading: a local file, or a store object streamed with retries.

    Raises:
        OSError: the file cannot be opened (missing, no permission). A store object is opened on the first
            read, which raises the same errors (``FileNotFoundError``, ``PermissionError``, ...).
    """
    loc = location(path)
    if not is_url(loc):
        return open(loc, "rb")  # noqa: SIM115 - the caller closes it
    fs, key = loc.fs, loc.path

    def open_at(offset: int) -> BinaryIO:
        handle = fs.open(key, "rb", block_size=BLOCK_SIZE, cache_type="readahead")
        if offset:
            handle.seek(offset)
        return handle

    return io.BufferedReader(RetryingReader(open_at, str(loc)), buffer_size=1 << 20)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- identity
def object_fingerprint(path: Any) -> str | None:
    """A store object's identity from its listing: ``etag:<etag>:<size>`` (or the store's md5/crc checksum);
    None for a local path or a store that reports none (then the caller hashes the bytes)."""
    loc = location(path)
    if not is_url(loc):
        return None
    info = loc.fs.info(loc.path)
    for field in ("ETag", "etag", "md5Hash", "crc32c", "sha256", "checksum"):
        value = info.get(field)
        if value:
            return f"{field.lower()}:{str(value).strip(chr(34))}:{info.get('size')}"
    return None


def size_of(path: Any) -> int:
    """The size in bytes of a file or store object."""
    loc = location(path)
    return int(loc.stat().st_size)


# ---------------------------------------------------------------------------------------------- writing
def read_text(path: Any) -> str:
    """The UTF-8 text of a file or store object (``FileNotFoundError`` when missing)."""
    return location(path).read_text(encoding="utf-8")


def write_text(path: Any, text: str) -> None:
    """Write a small text file: atomically on local disk (temporary file + rename), as one put on a store
    (an object appears whole or not at all)."""
    loc = location(path)
    if is_url(loc):
        loc.write_text(text, encoding="utf-8")
        return
    from unifilter_core.fileio import atomic_write_bytes

    atomic_write_bytes(loc, text.encode("utf-8"))


def upload(local: str | os.PathLike[str], target: Any) -> None:
    """Copy a finished local file to ``target`` (a URL) in one put."""
    loc = location(target)
    loc.fs.put_file(str(local), loc.path)


def remove(path: Any) -> None:
    """Delete a file or store object; a missing one is fine."""
    loc = location(path)
    with contextlib.suppress(FileNotFoundError):
        loc.unlink()


def publish(
    files: list[tuple[str | os.PathLike[str], Any]], manifest: tuple[str | os.PathLike[str], Any]
) -> None:
    """Commit local files to a store without rename: the target's manifest out, the data in, the manifest last.

    Args:
        files: ``(local file, target URL)`` pairs: the data (a score table, a filtered tar).
        manifest: ``(local manifest, target URL)``: uploaded only after every data file is in place.

    Deleting the old manifest first matters when a table is rescored: between the data upload and the new
    manifest, the old manifest must not vouch for the new (different) data.
    """
    local_manifest, target_manifest = manifest
    remove(target_manifest)
    for local, target in files:
        upload(local, target)
    upload(local_manifest, target_manifest)
