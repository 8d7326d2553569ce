"""``storage.RetryingReader``: a store read that fails part-way is resumed at the same byte, with backoff."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest

from tests.test_scoring_engine import caption_members, write_tar
from unifilter_core import storage
from unifilter_core.data import iter_raw_samples

DATA = bytes(range(256)) * 4096  # 1 MiB


class _Dropping(io.RawIOBase):
    """A stream over ``data`` from ``offset`` that raises ``error`` once ``fail_after`` bytes were read."""

    def __init__(self, data: bytes, offset: int, fail_after: int | None, error: BaseException) -> None:
        self._data, self._pos, self._left, self._error = data, offset, fail_after, error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left is not None and self._left <= 0:
            raise self._error
        n = min(len(buffer), len(self._data) - self._pos, self._left if self._left is not None else 1 << 62)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        if self._left is not None:
            self._left -= n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else len(self._data) + offset if whence == 2 else self._pos + offset
        return self._pos


def _opener(data: bytes, failures: list[int | None], error: BaseException) -> tuple[Callable, list[int]]:
    """``open_at`` whose n-th stream fails after ``failures[n]`` bytes (None: never); records the offsets."""
    offsets: list[int] = []

    def open_at(offset: int):
        offsets.append(offset)
        fail_after = failures[len(offsets) - 1] if len(offsets) <= len(failures) else None
        return _Dropping(data, offset, fail_after, error)

    return open_at, offsets


def test_transient_errors_resume_at_the_same_byte() -> None:
    """Each failure after progress is a new incident: it waits the first backoff again."""
    open_at, offsets = _opener(DATA, [100_000, 5, 300_000], ConnectionResetError("reset by peer"))
    waits: list[float] = []
    reader = storage.RetryingReader(open_at, "s3://b/x.tar", backoff=0.5, sleep=waits.append)
    assert io.BufferedReader(reader).read() == DATA
    assert offsets == [0, 100_000, 100_005, 400_005]
    assert waits == [0.5, 0.5, 0.5] and reader.retries == 3


def test_failures_without_progress_back_off_doubling() -> None:
    open_at, offsets = _opener(DATA, [100_000, 0, 0, 0, 0, 0], ConnectionResetError("reset by peer"))
    waits: list[float] = []
    reader = storage.RetryingReader(open_at, "s3://b/x.tar", attempts=7, backoff=1.0, sleep=waits.append)
    assert io.BufferedReader(reader).read() == DATA
    assert offsets == [0] + [100_000] * 6
    assert waits == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]  # doubling, at most 10 s


def test_gives_up_after_the_last_attempt_with_the_store_error() -> None:
    open_at, offsets = _opener(DATA, [10, 0, 0], TimeoutError("read timed out"))
    reader = storage.RetryingReader(open_at, "s3://b/x.tar", attempts=3, sleep=lambda s: None)
    handle = io.BufferedReader(reader)
    with pytest.raises(TimeoutError):
        handle.read()
    assert offsets == [0, 10, 10]


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("AccessDenied")])
def test_missing_objects_and_refused_credentials_are_not_retried(error: BaseException) -> None:
    open_at, offsets = _opener(DATA, [0], error)
    reader = storage.RetryingReader(open_at, "s3://b/x.tar", sleep=lambda s: pytest.fail("no retry expected"))
    with pytest.raises(type(error)):
        reader.read(10)
    assert offsets == [0]


def test_seek_and_size_through_a_failing_stream() -> None:
    open_at, _ = _opener(DATA, [0, None], ConnectionError("dropped"))
    reader = storage.RetryingReader(open_at, "s3://b/x.tar", sleep=lambda s: None)
    assert reader.seek(0, io.SEEK_END) == len(DATA)
    reader.seek(1000)
    assert reader.read(4) == DATA[1000:1004]


def test_a_store_that_keeps_failing_mid_tar_is_a_tar_read_error_row(tmp_path, monkeypatch) -> None:
    """Samples read before the store gave up keep their rows; the rest of the tar is one tar_read_error row."""
    tar = write_tar(tmp_path / "00000003.tar", caption_members(40, seed=3))
    data = tar.read_bytes()
    open_at, _ = _opener(data, [len(data) // 2] + [0] * 10, ConnectionResetError("reset by peer"))

    def open_input(path):
        return io.BufferedReader(storage.RetryingReader(open_at, str(path), attempts=3, sleep=lambda s: None))

    monkeypatch.setattr(storage, "open_input", open_input)
    rows = list(iter_raw_samples("s3://bucket/shards/00000003.tar"))
    failures = [r for r in rows if r.failure is not None]
    assert failures and failures[-1].failure.reason.value == "tar_read_error"
    assert "reset by peer" in (failures[-1].failure.detail or "")
    assert 10 < len(rows) - len(failures) < 40
