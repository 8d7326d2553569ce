"""The byte stream under a tar reader: decompression by magic number and a reader that can step back a little.

:mod:`tarfile` in stream mode reads ahead in records of :data:`tarfile.RECORDSIZE` bytes, so when it stops at an
end-of-archive block the bytes after that block are already gone from a forward-only stream (a gzip stream, or
any stream once tarfile buffered it). :class:`RewindableReader` keeps the last :data:`WINDOW` bytes it handed
out, so the reader can go back to the exact offset where tarfile stopped and look at what follows: more zero
blocks, the header of a concatenated archive (``cat a.tar b.tar``), or garbage. Memory stays flat (one window).

Compressed tars are decompressed here rather than by tarfile, with the standard library's file readers, which
also read multi-member gzip files (``cat a.tar.gz b.tar.gz``) to their end.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import tarfile
from typing import BinaryIO

#: How far back :meth:`RewindableReader.seek` can go: several of tarfile's read-ahead records.
WINDOW = 8 * tarfile.RECORDSIZE
_CHUNK = 1 << 20

# Magic numbers, in the order tarfile's own detection (``_StreamProxy``) checks them.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gz"),
    (b"BZh", "bz2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "xz"),  # legacy .lzma ("alone") streams, which LZMAFile reads too
)


def open_payload(fileobj: BinaryIO) -> tuple[BinaryIO, str]:
    """The decompressed tar bytes of ``fileobj`` and the compression name (``tar`` when plain).

    Nothing is read beyond the magic number; decompression errors surface on the first read.
    """
    magic = fileobj.read(6)
    fileobj.seek(0)
    comptype = next((name for prefix, name in _MAGIC if magic.startswith(prefix)), "tar")
    if comptype == "gz":
        return gzip.GzipFile(fileobj=fileobj, mode="rb"), comptype
    if comptype == "bz2":
        return bz2.BZ2File(fileobj), comptype
    if comptype == "xz":
        return lzma.LZMAFile(fileobj), comptype
    return fileobj, comptype


class RewindableReader:
    """A forward reader over ``raw`` that can seek back up to :data:`WINDOW` bytes behind the furthest read.

    Offsets are positions in ``raw``'s byte stream (the decompressed tar for compressed files).
    """

    def __init__(self, raw: BinaryIO, comptype: str = "tar") -> None:
        self._raw = raw
        self.comptype = comptype
        self._pos = 0  # the position handed out next
        self._end = 0  # how far ``raw`` was read
        self._tail = bytearray()  # the last bytes of raw[:_end]
        self._error: Exception | None = None  # raised by raw after the bytes already handed out
        self._read1 = getattr(raw, "read1", raw.read)

    def tell(self) -> int:
        return self._pos

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end of the stream); decompression errors propagate."""
        if size < 0:
            raise ValueError(
                "RewindableReader.read needs a size (reading everything would defeat flat memory)"
            )
        out = b""
        if self._pos < self._end:
            start = len(self._tail) - (self._end - self._pos)
            out = bytes(self._tail[start : start + size])
            self._pos += len(out)
            size -= len(out)
        if size == 0:
            return out
        data = self._read_raw(size, have=bool(out))
        if data:
            self._tail += data[-WINDOW:]
            del self._tail[: max(0, len(self._tail) - WINDOW)]
            self._end += len(data)
            self._pos = self._end
        return out + data

    def _read_raw(self, size: int, have: bool) -> bytes:
        """Up to ``size`` new bytes of ``raw``; an error after some bytes is kept for the next call.

        Decompressors raise as soon as they meet a cut or garbage; reading in ``read1`` steps keeps the bytes
        decoded before that point, so the samples before a cut still get their rows.
        """
        if self._error is not None:
            if have:
                return b""
            error, self._error = self._error, None
            raise error
        chunks: list[bytes] = []
        got = 0
        while got < size:
            try:
                chunk = self._read1(size - got)
            except Exception as exc:  # zlib/lzma/bz2/gzip errors: raised now, or after the bytes read so far
                if not chunks and not have:
                    raise
                self._error = exc
                break
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def seek(self, offset: int) -> None:
        """Go to ``offset``: back within the window, or forward (reading and discarding, flat memory).

        Raises:
            ValueError: ``offset`` lies before the window (a bug in the caller, never caused by data).
        """
        if offset < self._end - len(self._tail):
            raise ValueError(
                f"cannot seek back to {offset}: only bytes after {self._end - len(self._tail)} kept"
            )
        if offset <= self._end:
            self._pos = offset
            return
        self._pos = self._end
        while self._pos < offset and self.read(min(_CHUNK, offset - self._pos)):
            pass

    def read_block(self) -> bytes:
        """One tar block; shorter only at the real end of the stream (a pending decompression error is raised)."""
        block = self.read(tarfile.BLOCKSIZE)
        if len(block) < tarfile.BLOCKSIZE and self._error is not None:
            error, self._error = self._error, None
            raise error
        return block

    def remaining(self, offset: int) -> int:
        """How many bytes the stream holds after ``offset`` (reads to the end for compressed streams)."""
        if self.comptype == "tar":
            return max(0, os.fstat(self._raw.fileno()).st_size - offset)
        self.seek(offset)
        count = 0
        while chunk := self.read(_CHUNK):
            count += len(chunk)
        return count

    def skip_zero_blocks(self, offset: int) -> tuple[int, bytes]:
        """From ``offset`` (block-aligned), skip whole zero blocks; the offset and bytes of the first other block.

        The block returned is empty at the end of the stream and shorter than a block when the stream ends
        inside it; a short block of zeros at the very end counts as padding (empty block returned).
        """
        self.seek(offset)
        while True:
            block = self.read_block()
            if not block or block.count(0) == len(block):
                if len(block) < tarfile.BLOCKSIZE:
                    return offset + len(block), b""
                offset += tarfile.BLOCKSIZE
                continue
            return offset, block
