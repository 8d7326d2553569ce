"""A cheap check that score tables can be written, made before a model is loaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_writable(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` when missing and write (then remove) a small probe file in it.

    Args:
        folder: where score tables will go.

    Returns:
        The folder.

    Raises:
        OSError: the folder cannot be created or written (read-only file system, permissions, disk full);
            the message names the folder.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True) as probe:
            probe.write(b"unifilter")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in {path}: {exc.strerror or exc}", str(path)) from exc
    return path
