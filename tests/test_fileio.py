"""unifilter_core.fileio: atomic writes, directory fsync, file hashes; and the lock of a synth output folder."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from unifilter_core import fileio


def test_atomic_write_bytes_and_text(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.json"
    assert fileio.atomic_write_bytes(path, b"one") == path  # parent created
    fileio.atomic_write_text(path, "twó")
    assert path.read_text(encoding="utf-8") == "twó"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]  # no temporary file left


def test_mode_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "page.html"
    fileio.atomic_write_bytes(path, b"x", mode=0o644)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failure_leaves_previous_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), fileio.atomic_file(path) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_given_temp_name_is_used_and_removed(tmp_path: Path) -> None:
    path, temp = tmp_path / "x.parquet", tmp_path / ".x.parquet.tmp-1-abc"
    with fileio.atomic_file(path, temp=temp) as handle:
        assert Path(handle.name) == temp
        handle.write(b"data")
    assert path.read_bytes() == b"data" and not temp.exists()


def test_default_temp_name_matches_the_stale_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "00000001.tar"
    with fileio.atomic_file(path):
        (name,) = (p.name for p in tmp_path.iterdir())
    assert name.startswith(".00000001.tar.") and name.endswith(".tmp")


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_fsync_dir_ignores_only_unsupported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    def refuse(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", refuse)
    fileio.fsync_dir(tmp_path)  # ignored


def test_fsync_dir_raises_other_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="I/O error"):
        fileio.fsync_dir(tmp_path)


def test_sha256_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3000)
    path.write_bytes(data)
    assert fileio.sha256_file(path, chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_synth_folder_lock_refuses_a_second_run(tmp_path: Path) -> None:
    from unifilter_core.synth.claude import ClaudeRunError, _exclusive

    with (
        _exclusive(tmp_path / "out"),
        pytest.raises(ClaudeRunError, match="another `unifilter synth` run is writing"),
        _exclusive(tmp_path / "out"),
    ):
        pass
    with _exclusive(tmp_path / "out"):  # released
        pass


def test_pretrain_image_copy_is_atomic_and_readable(tmp_path: Path) -> None:
    from unifilter_core.pretrain import _ImageSource

    images = tmp_path / "images"
    (images / "00000").mkdir(parents=True)
    (images / "00000" / "a.jpg").write_bytes(b"jpeg")
    dest = tmp_path / "out" / "00000" / "a.jpg"
    _ImageSource(images).copy_to("00000/a.jpg", dest)
    assert dest.read_bytes() == b"jpeg" and dest.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in dest.parent.iterdir()] == ["a.jpg"]
