"""Hostile inputs through the real readers and the real ``scores`` asset: one row each, counts reconcile."""

from __future__ import annotations

import json
import math
import random
import tarfile
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.reliability.conftest import catalog_counts, make_resources, materialize
from tests.tarfixtures import (
    bomb_png,
    caption_members,
    jpeg_bytes,
    truncate_file,
    write_caption_tar,
    write_hostile_caption_tar,
    write_hostile_interleaved_tar,
    write_tar,
)
from unifilter_core.data import ReaderLimits, iter_raw_samples, iter_samples
from unifilter_core.records import Reason, SampleFailure, status_of

SOURCES = [("hcap", "caption"), ("hdoc", "interleaved"), ("hdocm", "interleaved"), ("trunc", "caption")]
_VALID_REASONS = {str(r) for r in Reason}


def _build_root(root: Path) -> dict[str, list[tuple[str, Reason | None]] | None]:
    """One hostile tar per source under ``sources/<name>/0000000N.tar``; expected rows (None: not scripted)."""
    expected: dict[str, list[tuple[str, Reason | None]] | None] = {
        "hcap_0001": write_hostile_caption_tar(root / "sources/hcap/00000001.tar"),
        "hdoc_0002": write_hostile_interleaved_tar(root / "sources/hdoc/00000002.tar"),
        "hdocm_0003": write_hostile_interleaved_tar(root / "sources/hdocm/00000003.tar", style="members"),
    }
    trunc = write_caption_tar(root / "sources/trunc/00000004.tar", n=6)
    truncate_file(trunc, 0.55)
    expected["trunc_0004"] = None
    return expected


def _check_table(table: Path, tar: Path, expected: list[tuple[str, Reason | None]] | None) -> dict:
    rows = pq.read_table(table).to_pylist()
    raw = list(iter_raw_samples(tar))
    assert len(rows) == len(raw), "one row per sample the reader sees"
    assert [r["key"] for r in rows] == [s.key for s in raw], "rows in tar order"
    for row in rows:
        if row["status"] == "ok":
            assert row["reason"] is None and row["score"] is not None and math.isfinite(row["score"]), row
        else:
            assert row["reason"] in _VALID_REASONS and row["score"] is None, row
            assert row["status"] == str(status_of(Reason(row["reason"]))), row
    if expected is not None:
        got = [(r["key"], Reason(r["reason"]) if r["reason"] else None) for r in rows]
        assert got == expected
    return {"rows": rows, "n_raw": len(raw)}


def test_scores_asset_gives_every_hostile_sample_a_row(tmp_path: Path, rel_ckpt: Path) -> None:
    import dagster as dg

    from unifilter_dagster.assets.tars import scores, tar_manifest

    root = tmp_path / "root"
    expected = _build_root(root)
    resources = make_resources(root, rel_ckpt, SOURCES)
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        assert sorted(instance.get_dynamic_partitions("tars")) == sorted(expected)
        for key, exp in expected.items():
            result = materialize([scores], resources, instance, key)  # never raises: checked below
            assert result.success, key
            checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
            source, num = key.rsplit("_", 1)
            tar = root / "sources" / source / f"{int(num):08d}.tar"
            info = _check_table(root / "scores" / source / f"{int(num):08d}.parquet", tar, exp)
            failed = sum(r["status"] != "ok" for r in info["rows"]) / len(info["rows"])
            # a tar whose rows mostly failed is what the drift check warns about
            assert checks == {"one_row_per_sample": True, "scores_finite_in_range": True,
                              "score_drift": failed <= 0.5, "scorer_canary": True}, key  # fmt: skip
            (reason,) = duckdb.connect(str(root / "unifilter.duckdb"), read_only=True).execute(
                "SELECT reason FROM score_drift WHERE partition_key = ?", [key]).fetchone()  # fmt: skip
            assert ("error_share" in reason) == (failed > 0.5), key
            mat = result.asset_materializations_for_node("scores")[0]
            assert mat.metadata["rows"].value == info["n_raw"]
            if key == "trunc_0004":
                assert info["rows"][-1]["reason"] == "tar_truncated"
                assert [r["status"] for r in info["rows"][:-1]] == ["ok"] * (info["n_raw"] - 1)
            if key.startswith("hdoc"):  # dropped image slots are named in the ok row's detail
                by_key = {r["key"]: r for r in info["rows"]}
                assert by_key["noslotdata"]["status"] == "ok" and "slot 1" in by_key["noslotdata"]["detail"]
                assert "slot 1" in by_key["bomb"]["detail"]
    counts = catalog_counts(root / "unifilter.duckdb")
    assert counts["score_stats"] == 4 and counts["tars"] == 4
    assert counts["orphan_stats"] == counts["dup_stats"] == counts["dup_lineage"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truncated_tar_at_random_points_never_raises(tmp_path: Path, seed: int) -> None:
    """A tar cut anywhere: every row is a sample or a failure, the last one says the tar is truncated."""
    rng = random.Random(seed)
    tar = write_caption_tar(tmp_path / "00000000.tar", n=8)
    full = [s.key for s in iter_raw_samples(tar)]
    with tarfile.open(tar) as handle:
        last = handle.getmembers()[-1]
        data_end = last.offset_data + last.size  # past this only the end-of-archive zeros follow
    for i in range(6):
        cut = tmp_path / f"cut{i}.tar"
        cut.write_bytes(tar.read_bytes()[: rng.randrange(1, data_end)])
        rows = list(iter_samples(cut, "caption"))
        assert rows, "even an unreadable tar yields a row"
        failures = [s for _, s in rows if isinstance(s, SampleFailure)]
        assert failures and failures[-1].reason in (Reason.TAR_TRUNCATED, Reason.TAR_READ_ERROR)
        ok_keys = [k for k, s in rows if not isinstance(s, SampleFailure)]
        assert ok_keys == full[: len(ok_keys)], "samples before the cut are read intact"


def test_hostile_json_and_text_through_the_reader(tmp_path: Path) -> None:
    """Wrong JSON types, non-UTF-8 text, a 1 MB caption: rows with reasons; the long caption is cut, not fatal."""
    members = (
        caption_members("types1", meta={"uid": {"x": 1}, "url": 3, "caption": None})
        + caption_members("types2", meta=json.dumps([1, 2, 3]).encode())
        + caption_members("types3", meta=b'"just a string"')
        + caption_members("nul", text=b"caption with \x00 nul and \xff\xfe bytes")
        + caption_members("utf16", text="caption".encode("utf-16"))
        + caption_members("mega", text="x" * 1_048_576)
    )
    rows = dict(iter_samples(write_tar(tmp_path / "00000000.tar", members), "caption"))
    assert len(rows) == 6
    for key in ("types1", "types2", "types3"):
        assert isinstance(rows[key], SampleFailure) and rows[key].reason == Reason.INVALID_FIELDS, key
    for key in ("nul", "utf16"):
        assert isinstance(rows[key], SampleFailure) and rows[key].reason == Reason.TEXT_DECODE_ERROR, key
    mega = rows["mega"]
    assert not isinstance(mega, SampleFailure) and mega.text_truncated
    assert len(mega.text) == ReaderLimits().max_text_chars


_RSS_CHILD = r"""
import json, sys
from unifilter_core.data import ReaderLimits, iter_samples
def peak_kb():
    # VmHWM belongs to this address space; ru_maxrss survives execve and would report the forking pytest's peak
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
limits = ReaderLimits(max_member_bytes=4 * 2**20)
list(iter_samples(sys.argv[2], "caption", limits=limits))  # warm-up: imports, PIL plugins, first allocations
before = peak_kb()
rows = [(k, getattr(s, "reason", None)) for k, s in iter_samples(sys.argv[1], "caption", limits=limits)]
after = peak_kb()
print(json.dumps({"delta_kb": after - before, "rows": [[k, str(r) if r else None] for k, r in rows]}))
"""


def test_bomb_and_huge_member_keep_memory_bounded(tmp_path: Path, run_child) -> None:
    """A 50k x 50k PNG bomb, a JPEG declaring 60k x 60k and a 64 MB member: refused before allocation."""
    huge = b"\xff\xd8" + bytes(64 * 2**20)
    members = (
        caption_members("bomb", image=bomb_png(), image_ext="png")
        + caption_members("lying", image=_lying_jpeg((60_000, 60_000)))
        + caption_members("huge", image=huge)
        + caption_members("fine", image=jpeg_bytes())
    )
    tar = write_tar(tmp_path / "00000000.tar", members)
    warm = write_caption_tar(tmp_path / "warm" / "00000000.tar", n=2)
    child = run_child(_RSS_CHILD, str(tar), str(warm))
    assert child.wait() == 0, child.output()
    report = json.loads(child.output().strip().splitlines()[-1])
    assert report["rows"] == [
        ["bomb", "image_too_large"],
        ["lying", "image_too_large"],
        ["huge", "image_too_large"],
        ["fine", None],
    ]
    assert report["delta_kb"] < 48 * 1024, f"peak RSS grew by {report['delta_kb']} kB"


def _lying_jpeg(declared: tuple[int, int]) -> bytes:
    from tests.tarfixtures import lying_header_jpeg

    return lying_header_jpeg(declared)
