"""The filtered-tar writer and the atomic JSON writer of unifilter_core.data."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from tests import tarfixtures as tf
from unifilter_core.data import iter_raw_samples, write_filtered_tar, write_manifest_json
from unifilter_core.data import writer as writer_mod


def _members(tar: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(tar) as handle:
        return [(m.name, handle.extractfile(m).read()) for m in handle.getmembers()]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_kept_samples_are_copied_byte_for_byte(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "src.tar", 6)
    keep = {"000000001", "000000004", "not-in-tar"}
    out = tmp_path / "filtered" / "00000000.tar"
    summary = write_filtered_tar(src, keep, out)
    assert (summary.kept, summary.dropped, summary.unsafe, summary.missing) == (2, 4, 0, 1)
    assert summary.members_written == 6 and not summary.source_incomplete
    expected = [(n, d) for n, d in _members(src) if n.split(".")[0] in keep]
    assert _members(out) == expected
    with tarfile.open(out) as handle:
        info = handle.getmembers()[0]
        assert info.mode == 0o644 and info.mtime == 1_700_000_000 and info.uid == 0
    # stock webdataset sees the same samples
    stock = list(wds.WebDataset(str(out), shardshuffle=False))
    assert [s["__key__"] for s in stock] == ["000000001", "000000004"]
    assert stock[0]["jpg"] == dict(expected)["000000001.jpg"]
    assert _leftovers(out.parent) == []


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar binary")
def test_output_reads_with_the_tar_tool(tmp_path: Path) -> None:
    src = tf.write_tar(
        tmp_path / "src.tar", tf.document_members("doc1", ["a", None, "b", None], style="members")
    )
    out = tmp_path / "out.tar"
    write_filtered_tar(src, {"doc1"}, out)
    listing = subprocess.run(
        ["tar", "-tf", str(out)], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == ["doc1.json", "doc1.1.png", "doc1.3.png"]


def test_hostile_names_and_duplicates_are_never_written(tmp_path: Path) -> None:
    members, expected = tf.hostile_caption_members()
    src = tf.write_tar(tmp_path / "src.tar", members)
    every_key = {key for key, _ in expected}
    out = tmp_path / "out" / "x.tar"
    summary = write_filtered_tar(src, every_key, out)
    names = [n for n, _ in _members(out)]
    assert not any(n.startswith("/") or ".." in n.split("/") for n in names)
    assert summary.unsafe == 2
    assert summary.kept + summary.dropped + summary.unsafe == len(list(iter_raw_samples(src)))
    assert names.count("ok_jpeg.txt") == 1 and names.count("dupmember.jpg") == 1
    # the first occurrence of a duplicated key wins
    first = next(data for name, data in members if name == "ok_jpeg.txt")
    assert dict(_members(out))["ok_jpeg.txt"] == first == b"a red square on a white background"
    # extracting the output with tarfile's strict filter writes only inside the target folder
    target = tmp_path / "extract"
    with tarfile.open(out) as handle:
        handle.extractall(target, filter="data")
    assert all(target in p.resolve().parents for p in target.rglob("*"))
    assert not (tmp_path / "evil.jpg").exists()


def test_truncated_source_keeps_only_complete_samples(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "src.tar", 3)
    data = src.read_bytes()
    src.write_bytes(data[: data.index(b"000000002.jpg") + 600])
    summary = write_filtered_tar(src, {"000000000", "000000001", "000000002"}, tmp_path / "out.tar")
    assert summary.source_incomplete and summary.kept == 2 and summary.failed_kept == 1
    assert {n.split(".")[0] for n, _ in _members(tmp_path / "out.tar")} == {"000000000", "000000001"}


def test_crash_mid_write_leaves_previous_file_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    src = tf.write_caption_tar(tmp_path / "src.tar", 4)
    out = tmp_path / "out.tar"
    out.write_bytes(b"previous complete output")
    calls = []

    def failing_addfile(self, tarinfo, fileobj=None):
        calls.append(tarinfo.name)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(self, tarinfo, fileobj)

    original = tarfile.TarFile.addfile
    monkeypatch.setattr(tarfile.TarFile, "addfile", failing_addfile)
    with pytest.raises(OSError, match="disk full"):
        write_filtered_tar(src, {"000000000", "000000001"}, out)
    assert out.read_bytes() == b"previous complete output"
    assert _leftovers(tmp_path) == []


def test_write_is_fsynced_before_rename(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = writer_mod.os.fsync, writer_mod.os.replace
    monkeypatch.setattr(writer_mod.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        writer_mod.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    write_filtered_tar(tf.write_caption_tar(tmp_path / "src.tar", 1), {"000000000"}, tmp_path / "o.tar")
    assert events[:2] == ["fsync", "replace"]


def test_bad_destinations_are_refused(tmp_path: Path) -> None:
    src = tf.write_caption_tar(tmp_path / "src.tar", 1)
    with pytest.raises(ValueError, match="directory"):
        write_filtered_tar(src, set(), tmp_path)
    with pytest.raises(ValueError, match="source tar"):
        write_filtered_tar(src, set(), tmp_path / "." / "src.tar")
    with pytest.raises(ValueError, match="name a file"):
        write_filtered_tar(src, set(), tmp_path / "..")


def test_manifest_json_is_atomic_and_strict(tmp_path: Path) -> None:
    path = tmp_path / "m" / "manifest.json"
    write_manifest_json(path, {"b": 1, "a": {"x": [1, 2]}, "name": "café"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": {"x": [1, 2]}, "b": 1, "name": "café"}
    with pytest.raises(TypeError):
        write_manifest_json(path, {"bad": object()})
    with pytest.raises(ValueError):
        write_manifest_json(path, {"nan": float("nan")})
    assert json.loads(path.read_text(encoding="utf-8"))["b"] == 1  # the earlier manifest survives
    assert _leftovers(path.parent) == []


def test_stale_temp_files_of_a_killed_writer_are_removed(tmp_path):
    import os
    import time

    from unifilter_core.data.writer import remove_stale_temp_files

    out = tmp_path / "00000001.tar"
    old = tmp_path / ".00000001.tar.abc123.tmp"
    fresh = tmp_path / ".00000001.tar.def456.tmp"
    other = tmp_path / ".00000002.tar.abc123.tmp"
    for p in (old, fresh, other):
        p.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    assert remove_stale_temp_files(out) == 1
    assert not old.exists() and fresh.exists() and other.exists()


def _scored_source(root: Path, uids: list[str]) -> tuple[Path, list[str]]:
    """A caption tar under ``root/sources/cap`` whose samples carry ``uids``, its score table (sample i scores
    i / 10) and a chosen threshold of 0.25; returns the tar and the keys kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    members = []
    keys = [f"{i:09d}" for i in range(len(uids))]
    for key, uid in zip(keys, uids, strict=True):
        members += tf.caption_members(key, meta={"uid": uid, "caption": "a red square", "key": key})
    tar = tf.write_tar(root / "sources/cap/00000003.tar", members)
    scores = [i / 10 for i in range(len(keys))]
    table = pa.table({"key": keys, "uid": uids, "score": scores, "status": ["ok"] * len(keys)})
    (root / "scores/cap").mkdir(parents=True)
    pq.write_table(table, root / "scores/cap/00000003.parquet")
    (root / "thresholds.json").write_text(json.dumps({"cap": {"threshold": 0.25}}))
    return tar, [k for k, s in zip(keys, scores, strict=True) if s >= 0.25]


def test_filtered_partition_writes_the_datacomp_subset_of_hex_uids(tmp_path: Path) -> None:
    import numpy as np

    from unifilter_core.partition_steps import TarSource, filter_partition

    uids = [f"{i:032x}" for i in (5, 1, 9, 3, 7)]
    tar, kept = _scored_source(tmp_path, uids)
    result = filter_partition(tmp_path, TarSource("cap", "caption"), tar, "cap_0003", tables=tmp_path)
    assert result["kept"] == len(kept) == 2
    subset = np.load(result["datacomp_subset"], allow_pickle=False)
    assert subset.dtype == np.dtype("u8,u8")
    assert [int(lo) for _, lo in subset.tolist()] == [3, 7]  # the kept samples (4th, 5th) uids, sorted
    manifest = json.loads((tmp_path / "filtered/cap/00000003.manifest.json").read_text())
    assert manifest["datacomp_subset"] == result["datacomp_subset"]


def test_filtered_partition_with_other_uids_skips_only_the_subset_file(tmp_path: Path) -> None:
    """uids that are not DataComp's (LAION keys, ...) leave the filtered tar whole and say why no subset."""
    from unifilter_core.partition_steps import TarSource, filter_partition

    tar, kept = _scored_source(tmp_path, [f"laion-{i}" for i in range(5)])
    result = filter_partition(tmp_path, TarSource("cap", "caption"), tar, "cap_0003", tables=tmp_path)
    assert result["kept"] == len(kept) and "datacomp_subset" not in result
    assert "not a 32-hex-digit DataComp uid" in result["datacomp_subset_skipped"]
    filtered = wds.WebDataset(str(tmp_path / "filtered/cap/00000003.tar"), shardshuffle=False)
    assert sorted(s["__key__"] for s in filtered) == kept
    assert not list((tmp_path / "filtered/cap").glob("*.npy"))
