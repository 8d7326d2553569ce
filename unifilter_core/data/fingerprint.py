"""Tar identity: a content fingerprint (sha256, streamed) and a cheap stat for change detection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from unifilter_core.fileio import sha256_file


class TarStat(NamedTuple):
    """What ``os.stat`` says about a tar: enough to notice most changes without reading it."""

    size: int
    mtime_ns: int


def tar_fingerprint(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of the file's bytes, read in 1 MiB chunks (constant memory).

    Raises:
        ValueError: when ``path`` is not a readable file.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cannot fingerprint {p}: not a file")
    return sha256_file(p)


def tar_stat(path: str | os.PathLike[str]) -> TarStat:
    """Size and modification time (ns) of ``path``; a cheap pre-check before :func:`tar_fingerprint`.

    Raises:
        ValueError: when ``path`` is not a file.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cannot stat {p}: not a file")
    st = p.stat()
    return TarStat(size=st.st_size, mtime_ns=st.st_mtime_ns)
