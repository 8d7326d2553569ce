"""Per-sample isolation in the scoring engine: one bad sample or tar never costs more than itself.

Exceptions while preparing a sample, row flags and escaping, the new table columns, a tar that fails inside a
block, symlinked shards, the manifest's independent listing, and typed output errors (disk full, read-only).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest

from tests.crashing import MisbehavingProcessor, ScorerWith
from tests.tarfixtures import caption_members, write_caption_tar, write_tar
from unifilter_core.records import Flag, Reason, SampleFailure, ScoreResult
from unifilter_core.scoring import (
    SCORE_TABLE_COLUMNS,
    OutputError,
    ScoringConfig,
    check_output_writable,
    engine,
    output,
    read_manifest,
    samples,
    score_tar,
    score_tars,
    table,
)
from unifilter_core.scoring.config import SampleKind
from unifilter_core.scoring.table import ScoreRow, ScoreTableWriter

CFG0 = ScoringConfig(batch_size=4, bucket_window=2, num_workers=0)


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint: Path) -> Any:
    from unifilter_core.scorer import load_scorer

    return load_scorer(tiny_checkpoint, batch_size=4)


def _rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


def _score(tar: Path, scorer: Any, out: Path, config: ScoringConfig = CFG0, **kw: Any) -> Any:
    return score_tar(tar, scorer, out, kind="caption", source="s", config=config, progress=False, **kw)


# ------------------------------------------------------------------------------------- 1. prepare_item isolation
@pytest.mark.parametrize(
    ("action", "exc_name"),
    [("memory", "MemoryError"), ("recursion", "RecursionError"), ("unicode", "UnicodeEncodeError")],
)
def test_exception_while_preparing_is_that_samples_internal_error_row(
    tmp_path: Path, scorer: Any, action: str, exc_name: str
) -> None:
    tar = write_caption_tar(tmp_path / "00000001.tar", n=6)
    proxy = ScorerWith(scorer, MisbehavingProcessor(scorer.processor, {"caption 2": action}))
    out = tmp_path / "o" / "00000001.parquet"
    summary = _score(tar, proxy, out)
    rows = _rows(out)
    assert [r["key"] for r in rows] == [f"{i:09d}" for i in range(6)]
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok", "ok"]
    assert rows[2]["reason"] == Reason.INTERNAL_ERROR.value and rows[2]["score"] is None
    assert (
        rows[2]["detail"].startswith(f"{exc_name}: ") and len(rows[2]["detail"]) <= samples.MAX_ERROR_DETAIL
    )
    assert rows[2]["uid"] == "uid000000002"  # ids read before the failure are kept
    assert summary.by_reason == {"internal_error": 1}


def test_prepare_item_carries_flags_of_raw_decoded_and_failure() -> None:
    failure = SampleFailure(Reason.JSON_DECODE_ERROR, "bad json", flags=[str(Flag.FIELD_ESCAPED)])
    raw = SimpleNamespace(key="k1", failure=failure, flags=[str(Flag.KEY_ESCAPED)])
    item = samples.prepare_item(0, raw, SampleKind.CAPTION, processor=None, limits=None)
    assert sorted(item.flags) == ["field_escaped", "key_escaped"]
    assert item.failure is not None and item.failure.reason == "json_decode_error"
    plain = SimpleNamespace(
        key="k2", failure=SampleFailure(Reason.MISSING_TEXT)
    )  # no `flags` attribute at all
    assert samples.prepare_item(1, plain, SampleKind.CAPTION, None, None).flags == []


# ------------------------------------------------------------------------------------- 2. columns and escaping
def test_new_columns_flags_and_last_line_escaping(tmp_path: Path) -> None:
    final = tmp_path / "00000001.parquet"
    ok = ScoreResult(score=1.5, n_tokens=3, quality_class=2, expected_level=1.75, flags=["text_escaped"])
    bad = ScoreResult.failed(Reason.INTERNAL_ERROR, "UnicodeEncodeError: '\udcff' here")
    with ScoreTableWriter(final, source="s", partition_key="s_0001", model_fingerprint="m") as writer:
        writer.write([ScoreRow("a\udcff", "u\ud800", "https://x/\udfff", ok, ["key_escaped"])])
        writer.write([ScoreRow("plain", None, None, bad)])
        writer.commit()
    assert pq.read_schema(final).names == list(SCORE_TABLE_COLUMNS)
    assert list(SCORE_TABLE_COLUMNS[-3:]) == ["flags", "quality_class", "expected_level"]
    first, second = _rows(final)
    assert (first["key"], first["uid"], first["url"]) == ("a\\xff", "u\\ud800", "https://x/\\udfff")
    assert first["flags"] == "key_escaped,text_escaped,uid_escaped,url_escaped"
    assert (first["quality_class"], first["expected_level"]) == (2, 1.75)
    assert second["flags"] is None and second["quality_class"] is None and second["expected_level"] is None
    assert second["detail"] == "UnicodeEncodeError: '\\xff' here"


def test_surrogate_in_sample_json_is_a_flagged_row(tmp_path: Path, scorer: Any) -> None:
    members = caption_members("000000000", meta=b'{"uid": "abc\\ud800", "url": "u"}')
    tar = write_tar(tmp_path / "00000002.tar", members + caption_members("000000001"))
    out = tmp_path / "o" / "00000002.parquet"
    _score(tar, scorer, out)
    rows = _rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert rows[0]["uid"] == "abc\\ud800" and "uid_escaped" in rows[0]["flags"].split(",")
    assert rows[1]["flags"] is None


# ------------------------------------------------------------------------------------- 4. a failing tar in a block
def _failing_reader(monkeypatch: pytest.MonkeyPatch, bad_name: str, exc: BaseException) -> None:
    real = samples.iter_raw_samples

    def reader(path: Any, **kw: Any) -> Any:
        if Path(path).name == bad_name:
            raise exc
        return real(path, **kw)

    monkeypatch.setattr(samples, "iter_raw_samples", reader)


def test_a_tar_that_fails_never_stops_the_block(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tars = [write_caption_tar(tmp_path / "in" / f"{i:08d}.tar", n=3, start=10 * i) for i in range(3)]
    _failing_reader(monkeypatch, "00000001.tar", RuntimeError("reader bug"))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        summaries = list(
            score_tars(tars, scorer, out, kind="caption", source="s", config=CFG0, progress=False)
        )
    assert [s.failed for s in summaries] == [False, True, False]
    failed = summaries[1]
    assert (
        failed.error == "RuntimeError: reader bug" and failed.rows == 0 and failed.partition_key == "s_0001"
    )
    assert "00000001.tar: FAILED" in failed.describe() and "reader bug" in failed.describe()
    assert "00000001.tar could not be scored" in caplog.text
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000000.parquet", "00000002.parquet"]
    assert summaries[2].rows == 3


def test_keyboard_interrupt_still_stops_the_block(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tars = [write_caption_tar(tmp_path / "in" / f"{i:08d}.tar", n=2) for i in range(2)]
    _failing_reader(monkeypatch, "00000000.tar", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        list(
            score_tars(tars, scorer, tmp_path / "o", kind="caption", source="s", config=CFG0, progress=False)
        )
    assert not (tmp_path / "o" / "00000001.parquet").exists()


# ------------------------------------------------------------------------------------- 5. symlinked shards
def test_symlinked_shard_keeps_its_own_name(tmp_path: Path, scorer: Any) -> None:
    real = write_caption_tar(tmp_path / "in" / "00000000.tar", n=2)
    link = tmp_path / "in" / "00000007.tar"
    link.symlink_to(real.name)
    out = tmp_path / "out"
    summaries = list(
        score_tars([real, link], scorer, out, kind="caption", source="s", config=CFG0, progress=False)
    )
    assert [s.partition_key for s in summaries] == ["s_0000", "s_0007"]
    assert {r["partition_key"] for r in _rows(out / "00000007.parquet")} == {"s_0007"}
    manifest = read_manifest(out / "00000007.manifest.json")
    assert manifest["partition_key"] == "s_0007" and manifest["tar"]["name"] == "00000007.tar"
    assert manifest["tar"]["path"] == str(link) and manifest["tar"]["resolved_path"] == str(real.resolve())
    assert (
        manifest["tar"]["fingerprint"] == read_manifest(out / "00000000.manifest.json")["tar"]["fingerprint"]
    )


# ------------------------------------------------------------------------------------- 6. independent listing
def test_manifest_records_the_independent_listing(tmp_path: Path, scorer: Any) -> None:
    tar = write_caption_tar(tmp_path / "00000003.tar", n=5)
    out = tmp_path / "o" / "00000003.parquet"
    _score(tar, scorer, out)
    listing = read_manifest(out.with_name("00000003.manifest.json"))["listing"]
    assert listing == {"samples": 5, "members": 15, "missing_keys": 0, "missing_examples": [], "error": None}


def test_listing_catches_a_sample_the_reader_missed(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tar = write_caption_tar(tmp_path / "00000004.tar", n=5)
    real = engine.iter_items

    def lossy(*args: Any, **kw: Any) -> Any:  # a reader bug: one sample never comes out
        return (item for item in real(*args, **kw) if item.key != "000000003")

    monkeypatch.setattr(engine, "iter_items", lossy)
    out = tmp_path / "o" / "00000004.parquet"
    with caplog.at_level(logging.ERROR):
        _score(tar, scorer, out)
    listing = read_manifest(out.with_name("00000004.manifest.json"))["listing"]
    assert (listing["samples"], listing["missing_keys"], listing["missing_examples"]) == (5, 1, ["000000003"])
    assert "have no row in the score table" in caplog.text


# ------------------------------------------------------------------------------------- 8. output errors
def _enospc(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_writing_the_table_is_an_output_error(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = write_caption_tar(tmp_path / "00000005.tar", n=3)
    out = tmp_path / "o" / "00000005.parquet"
    monkeypatch.setattr(pq.ParquetWriter, "write_table", _enospc)
    with pytest.raises(OutputError) as info:
        _score(tar, scorer, out)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(out) in str(info.value) and "free disk space" in str(info.value)
    assert list(out.parent.iterdir()) == []  # no temporary file, no lock file, no table


def test_disk_full_while_writing_the_manifest_leaves_no_temp(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = write_caption_tar(tmp_path / "00000006.tar", n=3)
    out = tmp_path / "o" / "00000006.parquet"
    real_commit = table._commit

    def commit(tmp: Path, final: Path) -> None:
        if final.name.endswith(".manifest.json"):
            _enospc()
        real_commit(tmp, final)

    monkeypatch.setattr(table, "_commit", commit)
    with pytest.raises(OutputError, match="manifest.json: No space left on device"):
        _score(tar, scorer, out)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "00000006.parquet"
    ]  # incomplete: rescored next run
    monkeypatch.setattr(table, "_commit", real_commit)
    assert not _score(tar, scorer, out).resumed


def test_read_only_output_stops_the_block_with_an_output_error(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tars = [write_caption_tar(tmp_path / "in" / f"{i:08d}.tar", n=2) for i in range(2)]

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", read_only)
    blocks = score_tars(tars, scorer, tmp_path / "o", kind="caption", source="s", config=CFG0, progress=False)
    with pytest.raises(OutputError, match="read-only: pass --output-dir DIR"):
        next(iter(blocks))


def test_check_output_writable_raises_output_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_output_writable(tmp_path / "fine") == tmp_path / "fine"

    def denied(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(output.tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(OutputError) as info:
        check_output_writable(tmp_path / "denied")
    message = str(info.value)
    assert f"output folder {tmp_path / 'denied'} is not writable: Permission denied" in message
    assert "pass --output-dir DIR or fix its permissions" in message and info.value.errno == errno.EACCES


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_writable_on_a_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="is not writable"):
            check_output_writable(folder)
    finally:
        folder.chmod(0o755)
