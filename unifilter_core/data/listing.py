"""An independent count of the samples in a tar, for checking that a score table has a row for each of them.

The streaming reader (:mod:`unifilter_core.data.tars`) reads members in stream mode and decides, member by
member, what becomes a row. A check that counted rows with that same reader could never fail when the reader
misses samples (it once stopped at the first end-of-archive block of concatenated tars). This module lists the
archive another way: ``tarfile`` in random-access mode with ``ignore_zeros=True``, which seeks over member data and
walks past end-of-archive blocks to the real end of the file, and it keeps only what names a sample: the
webdataset key (member path up to the first ``.`` of the basename) of every regular, non-meta member that has an
extension. Names are escaped exactly as the reader escapes them, so the two key sets are comparable; a member
with an unsafe name (absolute, ``..``) counts under the key the reader gives its ``unsafe_member_name`` row (its
name when it has no extension).

The two agree on the key set of whole tars, concatenated ones included; on a truncated tar the listing's keys are
a subset of the reader's (the reader also names the sample that was cut). Garbage where a header should be ends
the reader (``tar_read_error``) while ``ignore_zeros`` walks over it, so there the listing may hold more keys.
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass, field

from webdataset.tariterators import base_plus_ext

from unifilter_core import storage
from unifilter_core.data.tars import is_unsafe_member_name
from unifilter_core.data.text import escape_unencodable

_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta pattern


@dataclass(slots=True)
class TarListing:
    """What the independent listing found.

    Attributes:
        keys: the distinct sample keys (escaped like the reader's keys).
        members: regular sample members seen.
        error: why the listing stopped before the end of the file (truncated or unreadable), else None.
    """

    keys: set[str] = field(default_factory=set)
    members: int = 0
    error: str | None = None

    @property
    def samples(self) -> int:
        return len(self.keys)


def sample_key(name: str) -> str | None:
    """The webdataset key of a member name (escaped), or None for names without an extension."""
    key, ext = base_plus_ext(name)
    if key is None or ext is None:
        return None
    return escape_unencodable(key)[0]


def list_tar_samples(path: str | os.PathLike[str]) -> TarListing:
    """List the sample keys of a tar to its real end (never raises on bad data).

    Args:
        path: a tar file (plain or compressed), local or a store URL.

    Returns:
        A :class:`TarListing`; ``error`` is set when the archive could not be read to its end (the keys found
        before that point are kept).
    """
    listing = TarListing()
    try:
        with (
            storage.open_input(path) as fileobj,
            tarfile.open(fileobj=fileobj, mode="r:*", ignore_zeros=True) as archive,
        ):
            while True:
                try:
                    info = archive.next()
                except Exception as exc:  # tarfile, zlib, lzma, bz2 raise many types on hostile bytes
                    listing.error = f"{type(exc).__name__}: {exc}"
                    break
                if info is None:
                    break
                archive.members = []  # keep memory flat on tars with many members
                if not info.isreg() or _META_RE.match(info.name):
                    continue
                key = sample_key(info.name)
                if key is None and is_unsafe_member_name(info.name):
                    key = escape_unencodable(info.name)[0]  # the reader's unsafe_member_name row
                if key is None:
                    continue
                listing.keys.add(key)
                listing.members += 1
    except Exception as exc:  # never raises on bad data (lzma.LZMAError is not an OSError)
        listing.error = f"{type(exc).__name__}: {exc}"
    return listing
