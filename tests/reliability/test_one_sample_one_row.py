"""Web-scale triggers end to end: one hostile sample anywhere in a tar costs exactly its own row.

Each sample below once killed its whole tar (no table; in the CLI every later tar of the block was never scored;
in Dagster the partition failed on every run), or vanished without a row. They are placed at the start, the
middle and the end of a tar of good samples and scored through ``unifilter score`` (with a decode worker) and
through the ``scores`` asset.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.reliability.conftest import make_resources, materialize
from tests.tarfixtures import caption_members, document_members, jpeg_bytes
from unifilter_core.cli import main


def _thin_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _write_raw_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Names are written as raw bytes (``surrogateescape``), so a name may hold bytes that are not UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def _meta(key: str, **fields: Any) -> dict[str, Any]:
    return {"uid": f"uid{key}", "url": f"https://example.com/{key}.jpg", "key": key, **fields}


#: (key as stored in the table, members, expected status, expected reason, expected flag)
def _hostile_caption_samples() -> list[tuple[str, list[tuple[str, bytes]], str, str | None, str | None]]:
    cap = "a red square on a white background"
    return [
        ("uid_sur", caption_members("uid_sur", meta=_meta("uid_sur", uid="abc\ud800")), "ok", None, "uid_escaped"),
        ("url_sur", caption_members("url_sur", meta=_meta("url_sur", url="https://x.org/\udfff")), "ok", None,
         "url_escaped"),
        ("cap_sur", caption_members("cap_sur", text=None, meta=_meta("cap_sur", caption=f"{cap} \ud83d")), "ok",
         None, "text_escaped"),
        ("name\\xff", caption_members("name\udcff"), "ok", None, "key_escaped"),
        ("thin1", caption_members("thin1", image=_thin_png(1, 60000), image_ext="png"), "skipped",
         "image_too_large", None),
        ("thin2", caption_members("thin2", image=_thin_png(2, 40000), image_ext="png"), "skipped",
         "image_too_large", None),
        ("nul", caption_members("nul", text=b"\x00\x00\x00", meta=_meta("nul")), "error", "missing_text", None),
        ("ctrl", caption_members("ctrl", text="\x01\x02\x1b\u200b", meta=_meta("ctrl")), "error",
         "missing_text", None),
    ]  # fmt: skip


def _good(key: str) -> list[tuple[str, bytes]]:
    return caption_members(key, image=jpeg_bytes(color=(len(key) * 40 % 256, 90, 20)), text=f"caption {key}")


def _hostile_caption_tar(path: Path) -> dict[str, tuple[str, str | None, str | None]]:
    """Good samples with the hostile ones spread over start, middle and end; expected rows by key."""
    hostile = _hostile_caption_samples()
    members: list[tuple[str, bytes]] = []
    expected: dict[str, tuple[str, str | None, str | None]] = {}
    for i, (key, sample, status, reason, flag) in enumerate(hostile):
        members += sample
        expected[key] = (status, reason, flag)
        good = f"good{i:02d}"
        members += _good(good)
        expected[good] = ("ok", None, None)
    _write_raw_tar(path, members)
    return expected


def _check_rows(table: Path, expected: dict[str, tuple[str, str | None, str | None]]) -> None:
    rows = pq.read_table(table).to_pylist()
    got = {r["key"]: r for r in rows}
    assert len(rows) == len(expected) and set(got) == set(expected), sorted(got)
    for key, (status, reason, flag) in expected.items():
        row = got[key]
        assert (row["status"], row["reason"]) == (status, reason), row
        flags = (row.get("flags") or "").split(",") if row.get("flags") else []
        if flag is not None:
            assert flag in flags, row
        if status == "ok":
            assert row["score"] is not None, row
    assert got["uid_sur"]["uid"] == "abc\\ud800"
    assert got["url_sur"]["url"] == "https://x.org/\\udfff"


def test_cli_block_scores_every_hostile_sample_and_the_next_tar(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "shards"
    expected = _hostile_caption_tar(src / "00000000.tar")
    _write_raw_tar(src / "00000001.tar", _good("next0") + _good("next1"))
    out = tmp_path / "scores"
    argv = ["score", "caption", "--model-path", str(tiny_checkpoint), "--tar-file-path", str(src)]
    argv += ["--output-dir", str(out), "--device", "cpu", "--num-workers", "1", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr()
    _check_rows(out / "00000000.parquet", expected)
    assert pq.read_table(out / "00000001.parquet").num_rows == 2


def test_scores_asset_gives_each_hostile_sample_its_own_row(tmp_path: Path, rel_ckpt: Path) -> None:
    import dagster as dg

    from unifilter_dagster.assets.tars import scores, tar_manifest

    root = tmp_path / "root"
    expected = _hostile_caption_tar(root / "sources/hcap/00000003.tar")
    docs = document_members("doc_sur", ["text with a cut emoji \ud83d", None])
    docs += document_members("doc_ok", ["a plain text", None])
    _write_raw_tar(root / "sources/hdoc/00000004.tar", docs)
    resources = make_resources(root, rel_ckpt, [("hcap", "caption"), ("hdoc", "interleaved")], num_workers=1)
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        for key in ("hcap_0003", "hdoc_0004"):
            result = materialize([scores], resources, instance, key)
            assert result.success, key
            checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
            assert checks["one_row_per_sample"], key
    _check_rows(root / "scores/hcap/00000003.parquet", expected)
    doc_rows = {r["key"]: r for r in pq.read_table(root / "scores/hdoc/00000004.parquet").to_pylist()}
    assert doc_rows["doc_sur"]["status"] == "ok" and "text_escaped" in doc_rows["doc_sur"]["flags"]
    assert doc_rows["doc_ok"]["status"] == "ok"


def test_concatenated_tar_gets_every_row_and_the_check_fails_on_missing_rows(
    tmp_path: Path, rel_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``cat a.tar b.tar``: every sample of both parts gets a row; a reader that loses rows fails the check."""
    import dagster as dg

    import unifilter_core.scoring.samples as engine_samples
    from unifilter_dagster.assets.tars import scores, tar_manifest

    root = tmp_path / "root"
    parts = [_write_raw_tar(tmp_path / f"part{i}.tar", _good(f"p{i}a") + _good(f"p{i}b")) for i in range(3)]
    tar = root / "sources/cat/00000005.tar"
    tar.parent.mkdir(parents=True)
    tar.write_bytes(b"".join(p.read_bytes() for p in parts))
    resources = make_resources(root, rel_ckpt, [("cat", "caption")])
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        result = materialize([scores], resources, instance, "cat_0005")
        assert result.success
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["one_row_per_sample"].passed
        keys = pq.read_table(root / "scores/cat/00000005.parquet").column("key").to_pylist()
        assert keys == ["p0a", "p0b", "p1a", "p1b", "p2a", "p2b"]

        real = engine_samples.iter_raw_samples

        def first_part_only(*args: Any, **kwargs: Any):  # the old reader: stops at the first end-of-archive
            for raw in real(*args, **kwargs):
                if raw.key.startswith("p0"):
                    yield raw

        monkeypatch.setattr(engine_samples, "iter_raw_samples", first_part_only)
        for old in (root / "scores/cat").glob("00000005.*"):
            old.unlink()  # rescored from scratch by the lossy reader
        result = materialize([scores], resources, instance, "cat_0005")
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert not checks["one_row_per_sample"].passed
        assert checks["one_row_per_sample"].metadata["missing_keys"].value == 4
