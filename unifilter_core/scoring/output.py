"""Output folder errors: a typed :class:`OutputError` for disk-full / read-only / permission failures, and a
cheap :func:`check_output_writable` made before a model is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unifilter_core import storage

#: errno values that mean "this output location cannot take files": the user must act, a retry will not help
OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _advice(code: int | None) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (
            "free disk space or pass --output-dir DIR on another disk, then rerun (finished tables are kept)"
        )
    if code == errno.EROFS:
        return "the file system is read-only: pass --output-dir DIR on a writable one, then rerun"
    return "fix the folder's permissions or pass --output-dir DIR, then rerun"


class OutputError(OSError):
    """A score table, manifest or lock file could not be written (disk full, read-only folder, permissions).

    An :class:`OSError` (``errno``, ``strerror`` and ``filename`` are those of the cause), so existing
    ``except OSError`` handlers keep working; ``str()`` names the path and what to do. Nothing partial is left
    under the final name when it is raised.
    """

    def __init__(self, code: int | None, strerror: str, filename: str, message: str) -> None:
        super().__init__(code, strerror, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_os_error(cls, exc: OSError, path: str | os.PathLike[str]) -> OutputError:
        """Wrap ``exc`` met while writing ``path``."""
        if isinstance(exc, OutputError):
            return exc
        what = exc.strerror or str(exc)
        return cls(exc.errno, what, str(path), f"cannot write {path}: {what}; {_advice(exc.errno)}")


def is_output_error(exc: BaseException) -> bool:
    """True for an OS error that says the output location cannot take files (see :data:`OUTPUT_ERRNOS`)."""
    return isinstance(exc, OutputError) or (isinstance(exc, OSError) and exc.errno in OUTPUT_ERRNOS)


@contextlib.contextmanager
def output_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn disk-full / read-only / permission errors raised inside the block into :class:`OutputError`."""
    try:
        yield
    except OSError as exc:
        if is_output_error(exc):
            raise OutputError.from_os_error(exc, path) from exc
        raise


def check_output_writable(folder: str | os.PathLike[str]) -> Path:
    """Check that files can be created in ``folder`` by writing (then removing) a small probe file.

    Folders created for the probe are removed again, so a run that fails later (a bad checkpoint) leaves no
    empty output folder behind.

    Args:
        folder: where score tables will go.

    Returns:
        The folder.

    Raises:
        OutputError: the folder cannot be created or written (read-only file system, permissions, disk full,
            a file in the way); the message names the folder and what to do.
    """
    if storage.is_url(folder):
        return _check_store_writable(storage.location(folder))
    path = Path(folder)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True) as probe:
            probe.write(b"unifilter")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        what = exc.strerror or str(exc)
        message = (
            f"output folder {path} is not writable: {what} (cannot write in it); "
            "pass --output-dir DIR or fix its permissions"
        )
        raise OutputError(exc.errno, what, str(path), message) from exc
    finally:
        for made in created:  # deepest first
            if made.is_dir():
                made.rmdir()
    return path


def _check_store_writable(prefix: Any) -> Any:
    """Put and delete a small probe object under a store prefix: a missing bucket or a refused credential
    shows here, before the model loads (the message names the prefix, never a credential)."""
    probe = prefix / f".write-check-{uuid.uuid4().hex[:12]}"
    try:
        probe.write_bytes(b"unifilter")
        storage.remove(probe)
    except Exception as exc:  # botocore/aiohttp errors are not all OSErrors
        what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else (exc.strerror or str(exc))
        message = (
            f"output prefix {prefix} is not writable: {what}; check that the bucket exists and that the "
            "AWS_* credentials in the environment may write to it"
        )
        code = exc.errno if isinstance(exc, OSError) else None
        raise OutputError(code, what, str(prefix), message) from exc
    return prefix
