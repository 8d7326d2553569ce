"""Tar identity: a content fingerprint (sha256, streamed) and a cheap stat for change detection."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from unifilter_core import storage
from unifilter_core.fileio import sha256_file, sha256_stream


class TarStat(NamedTuple):
    """What ``os.stat`` says about a tar: enough to notice most changes without reading it."""

    size: int
    mtime_ns: int


def tar_fingerprint(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of the file's bytes, read in 1 MiB chunks (constant memory).

    A store object (``s3://...``) is identified by what its listing says instead (``etag:<etag>:<size>``, see
    :func:`unifilter_core.storage.object_fingerprint`): hashing it would read it a second time.

    Raises:
        ValueError: when ``path`` is not a readable file (or object).
    """
    if storage.is_url(path):
        try:
            tag = storage.object_fingerprint(path)
        except FileNotFoundError:
            raise ValueError(f"cannot fingerprint {path}: no such object") from None
        if tag is not None:
            return tag
        with storage.open_input(path) as handle:
            return sha256_stream(handle)
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cannot fingerprint {p}: not a file")
    return sha256_file(p)


def tar_stat(path: str | os.PathLike[str]) -> TarStat:
    """Size and modification time (ns) of ``path``; a cheap pre-check before :func:`tar_fingerprint`.

    Raises:
        ValueError: when ``path`` is not a file.
    """
    if storage.is_url(path):
        try:
            st = storage.location(path).stat()
        except FileNotFoundError:
            raise ValueError(f"cannot stat {path}: no such object") from None
        return TarStat(size=int(st.st_size), mtime_ns=int(st.st_mtime * 1e9))
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cannot stat {p}: not a file")
    st = p.stat()
    return TarStat(size=st.st_size, mtime_ns=st.st_mtime_ns)
