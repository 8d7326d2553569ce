"""Streaming raw samples out of webdataset tars, turning every tar-level problem into a record.

A sample is the run of consecutive tar members that share a key. Keys and extensions follow the webdataset
convention (``webdataset.tariterators.base_plus_ext``): the key is the member path up to the first ``.`` of its
basename and the rest is the extension, so ``shard/000123.0.jpg`` has key ``shard/000123`` and extension
``0.jpg``. Extensions are lower-cased (as webdataset does); ``member_names`` keeps the original names.

Why not ``webdataset.tariterators.tar_file_iterator`` itself: it hides each member's ``TarInfo``, so it cannot
refuse an oversized member before reading it into memory, and it cannot tell where the archive stopped (Python's
``tarfile`` silently ends iteration at a corrupt header or at a cut between members). This module iterates with
``tarfile`` in stream mode exactly as webdataset does (``r|*``, regular files only, ``__*__`` meta files skipped,
``base_plus_ext`` keys) and adds those checks. Tests verify the grouping against ``webdataset.WebDataset``.

Guarantees of :func:`iter_raw_samples`:
- It never raises on bad data: every problem is a :class:`RawSample` whose ``failure`` is set.
- Memory holds one sample (plus the set of keys seen, for duplicate detection), whatever the tar size.
- Every sample group in the tar yields exactly one row; a key that appears again after other keys, or a member
  that appears twice in one sample, yields an extra row with ``duplicate_key`` (the first occurrence wins), and a
  member with an unsafe name yields its own ``unsafe_member_name`` row. Directories, links, other non-regular
  members, webdataset meta files (``__*__``) and names without an extension are not samples and are ignored.
- Truncation: the sample whose member was cut gets ``tar_truncated`` and reading stops. When the archive simply
  ends without its end-of-archive marker (a cut between members), the last sample gets ``tar_truncated`` too,
  because nothing proves it was complete. Where no sample is open to carry the error (e.g. the last one already
  failed), a synthetic row keyed ``<tar file name>#truncated`` (or ``#read_error``) is yielded instead.
- A file that is not a readable tar yields one synthetic ``<tar file name>#read_error`` row (``tar_read_error``).
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from webdataset.tariterators import base_plus_ext

from unifilter_core.data.limits import ReaderLimits
from unifilter_core.records import Reason, SampleFailure

logger = logging.getLogger(__name__)

#: Image extensions recognised in tars, in the order a caption reader prefers them.
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta pattern
_BLOCK = tarfile.BLOCKSIZE


@dataclass(slots=True)
class RawSample:
    """The undecoded members of one sample (picklable, so it can be shipped to decode workers).

    Attributes:
        key: the webdataset ``__key__`` (member path up to the first ``.`` of the basename).
        members: extension (lower-cased, e.g. ``jpg``, ``txt``, ``0.jpg``) -> member bytes. Empty for rows whose
            data must not be used (unsafe names, duplicates).
        member_names: the original member names of this row, in tar order.
        failure: set when the sample cannot be used; decoders return it unchanged.
        member_mtimes: modification times of ``member_names`` (same order), so writers can preserve them.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    member_names: list[str] = field(default_factory=list)
    failure: SampleFailure | None = None
    member_mtimes: list[int] = field(default_factory=list)


def is_unsafe_member_name(name: str) -> bool:
    """True for names a writer or extractor must never use: absolute paths or paths with a ``..`` component.

    Backslashes count as separators and Windows drive prefixes (``C:``) as absolute, so the check also holds
    for archives written on Windows. Empty names and names with NUL bytes are unsafe too.
    """
    if not name or "\x00" in name:
        return True
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or re.match(r"^[A-Za-z]:", normalized):
        return True
    return ".." in PurePosixPath(normalized).parts


def split_key(name: str) -> tuple[str | None, str | None]:
    """Split a member name into (key, lower-cased extension) the webdataset way; (None, None) without a dot."""
    key, ext = base_plus_ext(name)
    if key is None or ext is None:
        return None, None
    return key, ext.lower()


def _synthetic(tar_path: Path, suffix: str, reason: Reason, detail: str) -> RawSample:
    return RawSample(key=f"{tar_path.name}#{suffix}", failure=SampleFailure(reason, detail))


def _classify_error(exc: BaseException) -> Reason:
    """Truncation (end of data inside a header or member) vs any other unreadable archive."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or "unexpected end" in text or "truncated" in text:
        return Reason.TAR_TRUNCATED
    return Reason.TAR_READ_ERROR


class _Grouper:
    """Groups members into rows in tar order; see the module docstring for the rules."""

    def __init__(self, max_member_bytes: int) -> None:
        self.max_member_bytes = max_member_bytes
        self.current: RawSample | None = None
        self.exts: set[str] = set()  # extensions of the open sample
        self.seen: set[str] = set()
        self.pending: list[RawSample] = []  # rows created while ``current`` is open, emitted after it

    def _close(self) -> list[RawSample]:
        rows = [] if self.current is None else [self.current]
        rows.extend(self.pending)
        self.current, self.pending = None, []
        return rows

    def start(self, key: str) -> list[RawSample]:
        """Rows completed by a member of ``key``; afterwards ``current`` is ``key``'s open sample."""
        if self.current is not None and self.current.key == key:
            return []
        rows = self._close()
        self.current = RawSample(key=key)
        self.exts = set()
        if key in self.seen:
            self.current.failure = SampleFailure(
                Reason.DUPLICATE_KEY, f"key {key!r} appears again after other keys; the first occurrence wins"
            )
        self.seen.add(key)
        return rows

    def wants_data(self, ext: str, name: str, mtime: int, size: int) -> bool:
        """Decide whether the member's bytes should be read, recording it when they should not."""
        cur = self.current
        assert cur is not None
        if ext in self.exts:
            self.pending.append(
                RawSample(
                    key=cur.key,
                    member_names=[name],
                    member_mtimes=[mtime],
                    failure=SampleFailure(
                        Reason.DUPLICATE_KEY, f"member {name!r} appears twice in sample {cur.key!r}"
                    ),
                )
            )
            return False
        self.exts.add(ext)
        cur.member_names.append(name)
        cur.member_mtimes.append(mtime)
        if cur.failure is not None:
            return False
        if size > self.max_member_bytes:
            reason = (
                Reason.IMAGE_TOO_LARGE if ext.rsplit(".", 1)[-1] in IMAGE_EXTS else Reason.TOO_MANY_TOKENS
            )
            cur.failure = SampleFailure(
                reason, f"member {name!r} is {size} bytes > max_member_bytes={self.max_member_bytes}"
            )
            cur.members.clear()
            return False
        return True

    def unsafe(self, name: str, mtime: int) -> list[RawSample]:
        """A row for a member with an unsafe name (its bytes are never read); returned when no sample is open."""
        key = split_key(name)[0] or name
        row = RawSample(
            key=key,
            member_names=[name],
            member_mtimes=[mtime],
            failure=SampleFailure(
                Reason.UNSAFE_MEMBER_NAME, f"member name {name!r} is absolute or contains '..'"
            ),
        )
        if self.current is None:
            return [row]
        self.pending.append(row)
        return []

    def finish(self, tar_path: Path, failure: SampleFailure | None) -> list[RawSample]:
        """All remaining rows; ``failure`` (an archive-level problem) goes to the open sample when it can."""
        if failure is not None:
            if self.current is not None and self.current.failure is None:
                self.current.failure = failure
                self.current.members.clear()
            else:
                suffix = "truncated" if failure.reason == Reason.TAR_TRUNCATED else "read_error"
                self.pending.append(_synthetic(tar_path, suffix, failure.reason, failure.detail or ""))
        return self._close()


def _end_state(stream: tarfile.TarFile, fileobj: BinaryIO, tar_path: Path) -> SampleFailure | None:
    """After tarfile stopped without an error: did the archive really end with its end-of-archive marker?

    ``tarfile`` stops silently at EOF, at a partial header and at a corrupt header after the first member; we
    look at the bytes where it stopped. Only plain (uncompressed) tars can be checked this way.
    """
    if getattr(stream.fileobj, "comptype", "tar") != "tar":
        return None
    offset = stream.offset
    fileobj.seek(offset)
    block = fileobj.read(_BLOCK)
    if not block:
        return SampleFailure(
            Reason.TAR_TRUNCATED, f"{tar_path.name} ends at byte {offset} without end marker"
        )
    if block.count(0) == len(block):
        return None
    if len(block) < _BLOCK:
        return SampleFailure(
            Reason.TAR_TRUNCATED, f"{tar_path.name} is cut inside a member header at {offset}"
        )
    size = os.fstat(fileobj.fileno()).st_size
    return SampleFailure(
        Reason.TAR_READ_ERROR,
        f"{tar_path.name}: unreadable member header at byte {offset}; {size - offset} bytes were not read",
    )


def iter_raw_samples(
    tar_path: str | os.PathLike[str], *, source: str | None = None, limits: ReaderLimits | None = None
) -> Iterator[RawSample]:
    """Stream the samples of one tar as :class:`RawSample` rows, never raising on bad data.

    Args:
        tar_path: a webdataset tar (plain; gzip/bz2/xz are read too, with fewer end-of-archive checks).
        source: the source name, used only in log messages.
        limits: ``max_member_bytes`` is applied here (members above it are never read); default limits if None.

    Yields:
        One row per sample group, plus the extra rows described in the module docstring.
    """
    path = Path(tar_path)
    grouper = _Grouper((limits or ReaderLimits()).max_member_bytes)
    try:
        fileobj = open(path, "rb")  # noqa: SIM115 - closed in the finally below, the generator may pause
    except OSError as exc:
        logger.warning("cannot open tar %s (source %s): %s", path, source, exc)
        yield _synthetic(path, "read_error", Reason.TAR_READ_ERROR, f"cannot open {path.name}: {exc}")
        return
    try:
        try:
            stream = tarfile.open(fileobj=fileobj, mode="r|*")  # noqa: SIM115 - closed below, after the loop
        except Exception as exc:  # tarfile/zlib/lzma raise many types on hostile bytes; all become a record
            reason = _classify_error(exc)
            suffix = "truncated" if reason == Reason.TAR_TRUNCATED else "read_error"
            logger.warning("unreadable tar %s (source %s): %s", path, source, exc)
            yield _synthetic(path, suffix, reason, f"{path.name}: {type(exc).__name__}: {exc}")
            return
        with stream:
            yield from _iter_stream(stream, fileobj, path, grouper, source)
    finally:
        fileobj.close()


def _iter_stream(
    stream: tarfile.TarFile, fileobj: BinaryIO, path: Path, grouper: _Grouper, source: str | None
) -> Iterator[RawSample]:
    """The member loop of :func:`iter_raw_samples`."""
    while True:
        try:
            info = stream.next()
        except Exception as exc:  # a header that cannot be read: stop, the open sample carries the error
            logger.warning("tar %s (source %s) stops: %s", path, source, exc)
            yield from grouper.finish(
                path, SampleFailure(_classify_error(exc), f"{type(exc).__name__}: {exc}")
            )
            return
        if info is None:
            break
        stream.members = []  # stream mode appends every TarInfo: keep memory flat
        name = info.name
        if not info.isreg() or _META_RE.match(name):
            continue
        mtime = int(info.mtime)
        if is_unsafe_member_name(name):
            yield from grouper.unsafe(name, mtime)
            continue
        key, ext = split_key(name)
        if key is None or ext is None:
            logger.debug("tar %s: member %r has no extension, not a sample member", path, name)
            continue
        yield from grouper.start(key)
        if not grouper.wants_data(ext, name, mtime, info.size):
            continue
        try:
            handle = stream.extractfile(info)
            data = handle.read() if handle is not None else b""
        except Exception as exc:  # end of data inside this member, or a decompression error
            logger.warning("tar %s (source %s): member %r unreadable: %s", path, source, name, exc)
            yield from grouper.finish(path, SampleFailure(_classify_error(exc), f"member {name!r}: {exc}"))
            return
        assert grouper.current is not None
        grouper.current.members[ext] = data
    yield from grouper.finish(path, _end_state(stream, fileobj, path))
