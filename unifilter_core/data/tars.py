"""Streaming raw samples out of webdataset tars, turning every tar-level problem into a record.

A sample is the run of consecutive tar members that share a key. Keys and extensions follow the webdataset
convention (``webdataset.tariterators.base_plus_ext``): the key is the member path up to the first ``.`` of its
basename and the rest is the extension, so ``shard/000123.0.jpg`` has key ``shard/000123`` and extension
``0.jpg``. Extensions are lower-cased (as webdataset does); ``member_names`` keeps the original names.

Keys are always storable text: a member name with non-UTF-8 bytes (``tarfile`` decodes names with
``surrogateescape``) gives a key with those bytes written as ``\\xNN`` escapes
(:func:`~unifilter_core.data.text.escape_unencodable`) and the row's ``flags`` hold ``key_escaped``;
``member_names`` keep the raw names, so a writer puts the original bytes back. Duplicate detection compares the
escaped keys (they are what a score table stores).

Why not ``webdataset.tariterators.tar_file_iterator`` itself: it hides each member's ``TarInfo``, so it cannot
refuse an oversized member before reading it into memory, and it cannot tell where the archive stopped (Python's
``tarfile`` silently ends iteration at a corrupt header, at a cut between members and at the first
end-of-archive block, which drops every sample of ``cat a.tar b.tar`` after ``a.tar``). This module iterates with
``tarfile`` in stream mode as webdataset does (regular files only, ``__*__`` meta files skipped, ``base_plus_ext``
keys) and adds those checks. Compression is detected by magic number and undone by the standard library
(:mod:`unifilter_core.data.tarstream`). Tests verify the grouping against ``webdataset.WebDataset``.

Guarantees of :func:`iter_raw_samples`:
- It never raises on bad data: every problem is a :class:`RawSample` whose ``failure`` is set.
- Memory holds one sample (plus the set of keys seen, for duplicate detection), whatever the tar size.
- Every sample group in the tar yields exactly one row; a key that appears again after other keys, or a member
  that appears twice in one sample, yields an extra row with ``duplicate_key`` (the first occurrence wins), and a
  member with an unsafe name yields its own ``unsafe_member_name`` row. Directories, links, other non-regular
  members, webdataset meta files (``__*__``) and names without an extension are not samples and are ignored.
- Concatenated tars: after the end-of-archive blocks (two zero blocks, or any run of zero blocks), reading goes
  on to the real end of the file; another tar header there starts the next part, whose samples get rows like the
  first part's (a key already seen in an earlier part is a ``duplicate_key`` row). Compressed files work the
  same way (a tar concatenated inside one gzip stream, or ``cat a.tar.gz b.tar.gz``).
- Garbage: bytes that are neither zeros nor a tar header where a header should be (after a member, or after the
  end-of-archive blocks) yield ``tar_read_error`` naming the byte offset and how many bytes were not read.
- Truncation: the sample whose member was cut gets ``tar_truncated`` and reading stops. When the archive simply
  ends without its end-of-archive marker (a cut between members), the last sample gets ``tar_truncated`` too,
  because nothing proves it was complete. Where no sample is open to carry the error (e.g. the last one already
  failed), a synthetic row keyed ``<tar file name>#truncated`` (or ``#read_error``) is yielded instead.
- A file that is not a readable tar yields one synthetic ``<tar file name>#read_error`` row (``tar_read_error``).
- Hostile headers (a pax ``mtime`` of ``inf`` or ``nan``, huge numbers) never raise: they become a row or a
  failure like any other unreadable header.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tarfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from webdataset.tariterators import base_plus_ext

from unifilter_core import storage
from unifilter_core.data.limits import ReaderLimits
from unifilter_core.data.tarstream import RewindableReader, open_payload
from unifilter_core.data.text import escape_unencodable
from unifilter_core.records import Flag, Reason, SampleFailure

logger = logging.getLogger(__name__)

#: Image extensions recognised in tars, in the order a caption reader prefers them.
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")

_META_RE = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta pattern
_BLOCK = tarfile.BLOCKSIZE


@dataclass(slots=True)
class RawSample:
    """The undecoded members of one sample (picklable, so it can be shipped to decode workers).

    Attributes:
        key: the webdataset ``__key__`` (member path up to the first ``.`` of the basename), escaped when the
            name held bytes UTF-8 cannot store (``flags`` then has ``key_escaped``).
        members: extension (lower-cased, e.g. ``jpg``, ``txt``, ``0.jpg``) -> member bytes. Empty for rows whose
            data must not be used (unsafe names, duplicates).
        member_names: the original member names of this row, in tar order.
        failure: set when the sample cannot be used; decoders return it unchanged.
        member_mtimes: modification times of ``member_names`` (same order), so writers can preserve them.
        flags: :class:`~unifilter_core.records.Flag` codes of the row (``key_escaped``); decoders copy them to
            the decoded sample or failure.
    """

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    member_names: list[str] = field(default_factory=list)
    failure: SampleFailure | None = None
    member_mtimes: list[int] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


def with_flags(failure: SampleFailure, flags: list[str]) -> SampleFailure:
    """``failure`` with ``flags`` added (no duplicates, order kept); returns the same object."""
    failure.flags.extend(flag for flag in flags if flag not in failure.flags)
    return failure


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


def _escaped(text: str) -> str:
    return escape_unencodable(text)[0]


def _key_flags(escaped: bool) -> list[str]:
    return [str(Flag.KEY_ESCAPED)] if escaped else []


def _fail(reason: Reason, detail: str) -> SampleFailure:
    """A failure whose detail is storable text (exception messages may quote raw names)."""
    return SampleFailure(reason, _escaped(detail))


def _synthetic(tar_path: Path, suffix: str, reason: Reason, detail: str) -> RawSample:
    name, escaped = escape_unencodable(tar_path.name)
    return RawSample(key=f"{name}#{suffix}", failure=_fail(reason, detail), flags=_key_flags(escaped))


def _classify_error(exc: BaseException) -> Reason:
    """Truncation (end of data inside a header or member) vs any other unreadable archive."""
    text = str(exc).lower()
    if isinstance(exc, EOFError) or any(
        cut in text for cut in ("unexpected end", "truncated", "ended before")
    ):
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

    def start(self, key: str, escaped: bool = False) -> list[RawSample]:
        """Rows completed by a member of ``key`` (already escaped); afterwards ``current`` is its open sample."""
        if self.current is not None and self.current.key == key:
            return []
        rows = self._close()
        self.current = RawSample(key=key, flags=_key_flags(escaped))
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
                    flags=list(cur.flags),
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
        key, escaped = escape_unencodable(split_key(name)[0] or name)
        row = RawSample(
            key=key,
            member_names=[name],
            member_mtimes=[mtime],
            failure=SampleFailure(
                Reason.UNSAFE_MEMBER_NAME, f"member name {name!r} is absolute or contains '..'"
            ),
            flags=_key_flags(escaped),
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


def _is_header(block: bytes) -> bool:
    """True when ``block`` is a tar header with a valid checksum (the start of a concatenated archive)."""
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return True


def _after_part(reader: RewindableReader, end: int, name: str) -> tuple[int | None, SampleFailure | None]:
    """Where tarfile stopped without an error (``end``): the next archive's offset, or why reading ends there.

    ``tarfile`` stops silently at EOF, at a partial header, at a corrupt header and at an end-of-archive block;
    we look at the bytes where it stopped. After end-of-archive blocks (and any zero padding) the file may go
    on with another archive (``cat a.tar b.tar``): its offset is returned. ``(None, None)`` is a clean end.
    """
    reader.seek(end)
    first = reader.read_block()
    if not first:
        return None, _fail(Reason.TAR_TRUNCATED, f"{name} ends at byte {end} without end marker")
    if first.count(0) != len(first):
        if len(first) < _BLOCK:
            return None, _fail(Reason.TAR_TRUNCATED, f"{name} is cut inside a member header at {end}")
        return None, _not_read(reader, end, name, f"unreadable member header at byte {end}")
    offset, block = reader.skip_zero_blocks(end)
    if not block:
        return None, None
    if len(block) < _BLOCK:
        return None, _fail(Reason.TAR_TRUNCATED, f"{name} is cut inside a member header at {offset}")
    if not _is_header(block):
        what = f"bytes at {offset}, after the end-of-archive block at {end}, are not a tar header"
        return None, _not_read(reader, offset, name, what)
    logger.debug("%s: another archive starts at byte %d (concatenated tars)", name, offset)
    return offset, None


def _not_read(reader: RewindableReader, offset: int, name: str, what: str) -> SampleFailure:
    try:
        left = f"{reader.remaining(offset)} bytes were not read"
    except Exception as exc:  # a decompression error while counting: say so instead of a count
        left = f"the rest was not read ({type(exc).__name__} while counting it)"
    unit = "" if reader.comptype == "tar" else f" (offsets in the {reader.comptype}-decompressed stream)"
    return _fail(Reason.TAR_READ_ERROR, f"{name}: {what}; {left}{unit}")


def iter_raw_samples(
    tar_path: str | os.PathLike[str], *, source: str | None = None, limits: ReaderLimits | None = None
) -> Iterator[RawSample]:
    """Stream the samples of one tar as :class:`RawSample` rows, never raising on bad data.

    Args:
        tar_path: a webdataset tar, plain or compressed (gzip, bz2, xz), possibly several tars concatenated; a
            local path or a store URL (``s3://...``, read as a stream, see :mod:`unifilter_core.storage`).
        source: the source name, used only in log messages.
        limits: ``max_member_bytes`` is applied here (members above it are never read); default limits if None.

    Yields:
        One row per sample group, plus the extra rows described in the module docstring.
    """
    path = storage.location(tar_path)
    grouper = _Grouper((limits or ReaderLimits()).max_member_bytes)
    try:
        fileobj = storage.open_input(path)  # a local file, or a store object streamed with retries
        payload, comptype = open_payload(fileobj)
    except OSError as exc:
        logger.warning("cannot open tar %s (source %s): %s", path, source, exc)
        yield _synthetic(
            path, "read_error", Reason.TAR_READ_ERROR, f"cannot open {_escaped(path.name)}: {exc}"
        )
        return
    try:
        yield from _iter_parts(RewindableReader(payload, comptype), path, grouper, source)
    finally:
        if payload is not fileobj:
            payload.close()
        fileobj.close()


def _iter_parts(
    reader: RewindableReader, path: Path, grouper: _Grouper, source: str | None
) -> Iterator[RawSample]:
    """Read the archive and every archive concatenated after it, one ``tarfile`` stream per part."""
    name = _escaped(path.name)
    base = 0
    while True:
        try:
            stream = tarfile.open(fileobj=reader, mode="r|")  # noqa: SIM115 - closed below, after the loop
        except Exception as exc:  # tarfile/zlib/lzma raise many types on hostile bytes; all become a record
            logger.warning("unreadable tar %s (source %s) at byte %d: %s", path, source, base, exc)
            # nothing at all could be read: not a tar (or not the compression it claims), rather than a cut
            reason = _classify_error(exc) if reader.tell() > 0 else Reason.TAR_READ_ERROR
            failure = _fail(reason, f"{name} at byte {base}: {type(exc).__name__}: {exc}")
            if base == 0:
                suffix = "truncated" if reason == Reason.TAR_TRUNCATED else "read_error"
                yield _synthetic(path, suffix, reason, failure.detail or "")
                return
            yield from grouper.finish(path, failure)
            return
        with stream:
            failure = yield from _iter_stream(stream, path, grouper, source)
            end = base + stream.offset
        if failure is None:
            try:
                next_base, failure = _after_part(reader, end, name)
            except Exception as exc:  # a decompression error in the bytes after the archive
                next_base = None
                failure = _fail(_classify_error(exc), f"{name} after byte {end}: {type(exc).__name__}: {exc}")
            if next_base is not None:
                base = next_base
                reader.seek(base)
                continue
        yield from grouper.finish(path, failure)
        return


def _mtime(info: tarfile.TarInfo) -> int:
    """The member's mtime as an int; a pax ``mtime`` of ``inf``/``nan`` (hostile) becomes 0."""
    mtime = info.mtime
    return int(mtime) if isinstance(mtime, int) or math.isfinite(mtime) else 0


def _iter_stream(
    stream: tarfile.TarFile, path: Path, grouper: _Grouper, source: str | None
) -> Generator[RawSample, None, SampleFailure | None]:
    """The member loop of one archive part; returns the failure that stopped it (None: tarfile just stopped)."""
    while True:
        try:
            info = stream.next()
        except Exception as exc:  # a header that cannot be read: stop, the open sample carries the error
            logger.warning("tar %s (source %s) stops: %s", path, source, exc)
            return _fail(_classify_error(exc), f"{type(exc).__name__}: {exc}")
        if info is None:
            return None
        stream.members = []  # stream mode appends every TarInfo: keep memory flat
        name = info.name
        if not info.isreg() or _META_RE.match(name):
            continue
        mtime = _mtime(info)
        if is_unsafe_member_name(name):
            yield from grouper.unsafe(name, mtime)
            continue
        key, ext = split_key(name)
        if key is None or ext is None:
            logger.debug("tar %s: member %r has no extension, not a sample member", path, name)
            continue
        yield from grouper.start(*escape_unencodable(key))
        if not grouper.wants_data(ext, name, mtime, info.size):
            continue
        try:
            handle = stream.extractfile(info)
            data = handle.read() if handle is not None else b""
        except Exception as exc:  # end of data inside this member, or a decompression error
            logger.warning("tar %s (source %s): member %r unreadable: %s", path, source, name, exc)
            return _fail(_classify_error(exc), f"member {name!r}: {type(exc).__name__}: {exc}")
        assert grouper.current is not None
        grouper.current.members[ext] = data
