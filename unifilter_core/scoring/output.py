"""A cheap check that score tables can be written, made before a model is loaded."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output_writable(folder: str | os.PathLike[str]) -> Path:
    """Check that files can be created in ``folder`` by writing (then removing) a small probe file.

    Folders created for the probe are removed again, so a run that fails later (a bad checkpoint) leaves no
    empty output folder behind.

    Args:
        folder: where score tables will go.

    Returns:
        The folder.

    Raises:
        OSError: the folder cannot be created or written (read-only file system, permissions, disk full);
            the message names the folder.
    """
    path = Path(folder)
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-", delete=True) as probe:
            probe.write(b"unifilter")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write in {path}: {exc.strerror or exc}", str(path)) from exc
    finally:
        for made in created:  # deepest first
            if made.is_dir():
                made.rmdir()
    return path
