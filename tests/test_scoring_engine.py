"""The scoring engine: both tar layouts, parity with load_scorer, every failure as a row, resume, atomic writes."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unifilter_core.data import ReaderLimits
from unifilter_core.records import Reason, status_of
from unifilter_core.scoring import SCORE_TABLE_COLUMNS, ScoringConfig, read_manifest, score_tar, score_tars
from unifilter_core.scoring.batching import BatchRunner, plan_batches
from unifilter_core.scoring.table import TMP_MARKER, table_paths

REPO = Path(__file__).resolve().parents[1]
WORDS = [
    "a",
    "photo",
    "of",
    "red",
    "green",
    "blue",
    "small",
    "large",
    "cube",
    "sphere",
    "on",
    "the",
    "table",
    "next",
    "to",
    "dog",
    "cat",
    "garden",
]


# ------------------------------------------------------------------------------------------------ tar helpers
def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size or (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def caption_text(seed: int, n_words: int | None = None) -> str:
    rng = np.random.default_rng(seed + 1000)
    n = n_words or int(rng.integers(3, 25))
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def caption_members(n: int, seed: int = 0, long_index: int | None = None) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        key = f"{seed:04d}{i:05d}"
        text = caption_text(seed * 1000 + i, 60 if i == long_index else None)
        meta = {"uid": f"uid-{key}", "url": f"http://example.com/{key}.jpg", "caption": text, "key": key}
        members += [
            (f"{key}.jpg", image_bytes(seed * 1000 + i)),
            (f"{key}.txt", text.encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    return members


def document(seed: int, n_images: int) -> tuple[list[str | None], list[bytes | None]]:
    texts: list[str | None] = []
    images: list[bytes | None] = []
    for j in range(n_images * 2 + 1):
        if j % 2:
            texts.append(None)
            images.append(image_bytes(seed * 100 + j))
        else:
            texts.append(caption_text(seed * 100 + j))
            images.append(None)
    return texts, images


def document_members(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        texts, images = document(seed * 1000 + i, 1 + i % 3)
        info = [None if im is None else {"image_base64": base64.b64encode(im).decode()} for im in images]
        members.append((f"doc{i:05d}.json", json.dumps({"texts": texts, "image_info": info}).encode()))
    return members


def read_table(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def scorer(tiny_checkpoint: Path) -> Any:
    from unifilter_core.scorer import load_scorer

    return load_scorer(tiny_checkpoint, batch_size=4)


CFG0 = ScoringConfig(batch_size=4, bucket_window=2, num_workers=0)


# ------------------------------------------------------------------------------------------------ batching
def test_plan_batches_sorts_and_respects_limits() -> None:
    lengths = [30, 5, 12, 7, 50, 6, 9]
    batches = plan_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 for b in batches)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)
    budgeted = plan_batches(lengths, batch_size=8, max_batch_tokens=40)
    for batch in budgeted:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 40 or len(batch) == 1
    assert [4] in budgeted  # 50 tokens > budget: alone


# ------------------------------------------------------------------------------------------------ both layouts
def test_caption_tar_rows_in_order_and_equal_to_scorer(tmp_path: Path, scorer: Any) -> None:
    members = caption_members(11)
    tar = write_tar(tmp_path / "in" / "00000007.tar", members)
    out = tmp_path / "out" / "00000007.parquet"
    summary = score_tar(tar, scorer, out, kind="caption", source="datacomp", config=CFG0, progress=False)
    rows = read_table(out)
    assert pq.read_schema(out).names == list(SCORE_TABLE_COLUMNS)
    assert str(pq.read_schema(out).field("score").type) == "float"
    assert [r["key"] for r in rows] == [f"0000{i:05d}" for i in range(11)]
    assert {r["partition_key"] for r in rows} == {"datacomp_0007"}
    assert rows[3]["uid"] == "uid-000000003" and rows[3]["url"].endswith("000000003.jpg")
    assert all(r["status"] == "ok" and r["model_fingerprint"] == scorer.model_fingerprint for r in rows)
    pairs = [(Image.open(io.BytesIO(members[3 * i][1])), members[3 * i + 1][1].decode()) for i in range(11)]
    expected = [r.score for r in scorer.score_captions(pairs)]
    np.testing.assert_allclose([r["score"] for r in rows], np.float32(expected), rtol=0, atol=1e-5)
    assert summary.rows == 11 and summary.by_status == {"ok": 11} and not summary.resumed
    manifest = read_manifest(out.with_name("00000007.manifest.json"))
    assert manifest["table"]["rows"] == 11 and manifest["counts"]["status"] == {"ok": 11}
    assert (
        manifest["tar"]["bytes"] == tar.stat().st_size
        and manifest["model_fingerprint"] == scorer.model_fingerprint
    )
    assert manifest["config"]["kind"] == "caption" and manifest["config_hash"].startswith("sha256:")


def test_interleaved_tar_equal_to_scorer(tmp_path: Path, scorer: Any) -> None:
    tar = write_tar(tmp_path / "00000001.tar", document_members(7))
    out = tmp_path / "scores" / "00000001.parquet"
    score_tar(tar, scorer, out, kind="interleaved", source="obelics", config=CFG0, progress=False)
    rows = read_table(out)
    assert [r["key"] for r in rows] == [f"doc{i:05d}" for i in range(7)]
    assert [r["n_images"] for r in rows] == [1 + i % 3 for i in range(7)]
    docs = [dict(zip(("texts", "images"), document(i, 1 + i % 3), strict=True)) for i in range(7)]
    expected = [r.score for r in scorer.score_documents(docs)]
    np.testing.assert_allclose([r["score"] for r in rows], np.float32(expected), rtol=0, atol=1e-5)


def test_two_workers_give_the_same_table(tmp_path: Path, scorer: Any) -> None:
    tar = write_tar(tmp_path / "00000002.tar", caption_members(23, seed=2) + [("broken.jpg", b"nope")])
    one = tmp_path / "a" / "00000002.parquet"
    two = tmp_path / "b" / "00000002.parquet"
    score_tar(tar, scorer, one, kind="caption", source="s", config=CFG0, progress=False)
    cfg = ScoringConfig(batch_size=4, bucket_window=2, num_workers=2, worker_chunk=3, start_method="spawn")
    results = list(
        score_tars([tar], scorer, two.parent, kind="caption", source="s", config=cfg, progress=False)
    )
    assert results[0].rows == 24
    a, b = read_table(one), read_table(two)
    assert [r["key"] for r in a] == [r["key"] for r in b]
    assert [r["status"] for r in a] == [r["status"] for r in b]
    np.testing.assert_allclose(
        [r["score"] or 0.0 for r in a], [r["score"] or 0.0 for r in b], rtol=0, atol=1e-5
    )


# ------------------------------------------------------------------------------------------------ failures
def test_every_failure_becomes_a_row(tmp_path: Path, scorer: Any) -> None:
    good = caption_members(2)
    bad_json_meta = b"{not json"
    members = good + [
        ("badimg.jpg", b"\xff\xd8 not a jpeg"),
        ("badimg.txt", b"caption"),
        ("cut.jpg", image_bytes(5)[:60]),
        ("cut.txt", b"a truncated image"),
        ("notext.jpg", image_bytes(6)),
        ("notext.json", json.dumps({"uid": "u-notext"}).encode()),
        ("badjson.jpg", image_bytes(7)),
        ("badjson.txt", b"caption"),
        ("badjson.json", bad_json_meta),
        ("noimage.txt", b"text without an image"),
        ("cutlast.txt", b"the tar ends in the middle of my image"),
        ("cutlast.jpg", image_bytes(8, size=(100, 100))),
    ]
    tar = write_tar(tmp_path / "00000003.tar", members)
    # cut the archive in the middle of the last member's data: the reader reports tar_truncated
    with tarfile.open(tar) as t:
        last = t.getmembers()[-1]
    tar.write_bytes(tar.read_bytes()[: last.offset_data + last.size // 2])
    config = ScoringConfig(batch_size=4, num_workers=0)
    out = tmp_path / "o" / "00000003.parquet"
    summary = score_tar(tar, scorer, out, kind="caption", source="s", config=config, progress=False)
    rows = {r["key"]: r for r in read_table(out)}
    assert rows["000000000"]["status"] == "ok" and rows["000000001"]["status"] == "ok"
    assert rows["badimg"]["reason"] == Reason.IMAGE_DECODE_ERROR.value
    assert rows["cut"]["reason"] in (Reason.IMAGE_TRUNCATED.value, Reason.IMAGE_DECODE_ERROR.value)
    assert rows["notext"]["reason"] == Reason.MISSING_TEXT.value and rows["notext"]["uid"] == "u-notext"
    assert rows["badjson"]["reason"] == Reason.JSON_DECODE_ERROR.value
    assert rows["noimage"]["reason"] == Reason.MISSING_IMAGE.value
    assert (rows["cutlast"]["status"], rows["cutlast"]["reason"]) == ("error", Reason.TAR_TRUNCATED.value)
    for row in rows.values():
        assert (row["score"] is None) == (row["status"] != "ok")
    assert summary.rows == len(rows) and summary.by_status["ok"] == 2
    assert sum(summary.by_reason.values()) == len(rows) - 2


def test_image_too_large_is_skipped(tmp_path: Path, scorer: Any) -> None:
    members = caption_members(1) + [("huge.jpg", image_bytes(8, size=(300, 300))), ("huge.txt", b"big")]
    tar = write_tar(tmp_path / "00000004.tar", members)
    config = ScoringConfig(batch_size=4, num_workers=0, reader_limits=ReaderLimits(max_pixels=200 * 200))
    out = tmp_path / "o" / "00000004.parquet"
    score_tar(tar, scorer, out, kind="caption", source="s", config=config, progress=False)
    rows = {r["key"]: r for r in read_table(out)}
    assert (rows["huge"]["status"], rows["huge"]["reason"]) == ("skipped", Reason.IMAGE_TOO_LARGE.value)


def test_documents_over_limits_get_skipped_rows(tmp_path: Path, scorer: Any) -> None:
    texts, images = document(1, 12)
    info = [None if im is None else {"image_base64": base64.b64encode(im).decode()} for im in images]
    many = ("many.json", json.dumps({"texts": texts, "image_info": info}).encode())
    empty = ("empty.json", json.dumps({"texts": [], "image_info": []}).encode())
    tar = write_tar(tmp_path / "00000005.tar", document_members(2) + [many, empty])
    out = tmp_path / "o" / "00000005.parquet"
    score_tar(tar, scorer, out, kind="interleaved", source="s", config=CFG0, progress=False)
    rows = {r["key"]: r for r in read_table(out)}
    assert (rows["many"]["status"], rows["many"]["reason"]) == ("skipped", Reason.TOO_MANY_IMAGES.value)
    assert rows["empty"]["status"] == "skipped" and rows["empty"]["reason"] == Reason.EMPTY_DOCUMENT.value
    assert rows["doc00000"]["status"] == "ok"


class _Proxy:
    """A scorer stand-in: same processor/model, another fingerprint and/or a forward that fails."""

    def __init__(self, scorer: Any, fingerprint: str | None = None, poison_tokens: int | None = None) -> None:
        self._scorer, self._fp, self._poison = scorer, fingerprint, poison_tokens
        self.processor, self.options, self.calls = scorer.processor, scorer.options, 0

    @property
    def model_fingerprint(self) -> str:
        return self._fp or self._scorer.model_fingerprint

    def forward(self, samples: list[Any]) -> list[float]:
        self.calls += 1
        if self._poison is not None and any(s.n_tokens == self._poison for s in samples):
            raise RuntimeError("poisoned sample")
        return self._scorer.forward(samples)


def test_model_error_costs_only_the_failing_sample(tmp_path: Path, scorer: Any) -> None:
    tar = write_tar(tmp_path / "00000006.tar", caption_members(8, long_index=5))
    ref = tmp_path / "ref" / "00000006.parquet"
    score_tar(tar, scorer, ref, kind="caption", source="s", config=CFG0, progress=False)
    ref_rows = read_table(ref)
    poison = ref_rows[5]["n_tokens"]
    assert sum(r["n_tokens"] == poison for r in ref_rows) == 1
    out = tmp_path / "o" / "00000006.parquet"
    score_tar(
        tar,
        _Proxy(scorer, poison_tokens=poison),
        out,
        kind="caption",
        source="s",
        config=CFG0,
        progress=False,
    )
    rows = read_table(out)
    assert (rows[5]["status"], rows[5]["reason"]) == ("error", Reason.MODEL_ERROR.value)
    assert "poisoned" in rows[5]["detail"] and rows[5]["n_tokens"] == poison
    for i in (0, 1, 2, 3, 4, 6, 7):
        assert rows[i]["status"] == "ok" and abs(rows[i]["score"] - ref_rows[i]["score"]) < 1e-5


# ------------------------------------------------------------------------------------------------ resume
def test_resume_skips_unchanged_and_rescores_changed(tmp_path: Path, scorer: Any) -> None:
    tar = write_tar(tmp_path / "in" / "00000008.tar", caption_members(5))
    out = tmp_path / "out" / "00000008.parquet"

    def run(s: Any = scorer, config: ScoringConfig = CFG0, **kw: Any) -> Any:
        return score_tar(tar, s, out, kind="caption", source="s", config=config, progress=False, **kw)

    assert not run().resumed
    again = run()
    assert again.resumed and again.rows == 5 and again.by_status == {"ok": 5}
    # speed-only options do not invalidate the table
    assert run(config=ScoringConfig(batch_size=2, num_workers=0, max_batch_tokens=100)).resumed
    # score-relevant config change
    assert not run(
        config=ScoringConfig(batch_size=4, num_workers=0, reader_limits=ReaderLimits(max_pixels=10**6))
    ).resumed
    assert run(
        config=ScoringConfig(batch_size=4, num_workers=0, reader_limits=ReaderLimits(max_pixels=10**6))
    ).resumed
    assert not run().resumed  # back to the default limits: rescored
    # model change
    proxy = _Proxy(scorer, fingerprint="another-model")
    assert not run(proxy).resumed
    assert {r["model_fingerprint"] for r in read_table(out)} == {"another-model"}
    assert run(proxy).resumed and proxy.calls > 0
    # tar change
    write_tar(tar, caption_members(6, seed=1))
    changed = run(proxy)
    assert not changed.resumed and changed.rows == 6
    # forced rescore, and a missing manifest means "not complete"
    assert not run(proxy, force=True).resumed
    out.with_name("00000008.manifest.json").unlink()
    assert not run(proxy).resumed


def _boom_after_first_window(monkeypatch: pytest.MonkeyPatch) -> None:
    original = BatchRunner.run_window
    calls = {"n": 0}

    def run_window(self: BatchRunner, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt("simulated crash mid-tar")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BatchRunner, "run_window", run_window)


def test_crash_mid_tar_leaves_no_complete_table(
    tmp_path: Path, scorer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tar = write_tar(tmp_path / "00000009.tar", caption_members(20))
    out_dir = tmp_path / "out"
    table, manifest = table_paths(out_dir, tar)
    config = ScoringConfig(batch_size=2, bucket_window=2, num_workers=0, row_group_size=2)
    with monkeypatch.context() as m:
        _boom_after_first_window(m)
        with pytest.raises(KeyboardInterrupt):
            score_tar(tar, scorer, table, kind="caption", source="s", config=config, progress=False)
    assert not table.exists() and not manifest.exists()
    assert not list(out_dir.iterdir())  # the temporary file was removed too
    first = score_tar(tar, scorer, table, kind="caption", source="s", config=config, progress=False)
    assert first.rows == 20 and read_manifest(manifest)["table"]["rows"] == 20
    before = table.read_bytes()
    # a crash while rescoring keeps the previous complete table untouched
    with monkeypatch.context() as m:
        _boom_after_first_window(m)
        with pytest.raises(KeyboardInterrupt):
            score_tar(
                tar, scorer, table, kind="caption", source="s", config=config, progress=False, force=True
            )
    assert (
        table.read_bytes() == before
        and score_tar(tar, scorer, table, kind="caption", source="s", config=config, progress=False).resumed
    )


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import ScoringConfig, score_tar

    ckpt, tar, out = sys.argv[1:4]
    scorer = load_scorer(ckpt)
    forward = scorer.forward

    def slow(samples):
        time.sleep(0.2)
        return forward(samples)

    scorer.forward = slow
    config = ScoringConfig(batch_size=2, bucket_window=1, num_workers=1, row_group_size=2)
    score_tar(tar, scorer, out, kind="caption", source="s", config=config, progress=False)
    """
)


@pytest.mark.slow
def test_sigkill_mid_tar_then_rerun(tmp_path: Path, scorer: Any, tiny_checkpoint: Path) -> None:
    tar = write_tar(tmp_path / "00000010.tar", caption_members(60))
    out_dir = tmp_path / "out"
    table, manifest = table_paths(out_dir, tar)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tiny_checkpoint), str(tar), str(table)], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            temps = (
                [p for p in out_dir.glob(f"*{TMP_MARKER}*") if p.stat().st_size > 0]
                if out_dir.exists()
                else []
            )
            if temps:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "scoring finished before it could be killed"
        time.sleep(0.5)  # let it write a row group or two
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not table.exists() and not manifest.exists()
    assert list(out_dir.glob(f"*{TMP_MARKER}*")), "the killed run should have left its temporary file"
    summary = score_tar(tar, scorer, table, kind="caption", source="s", config=CFG0, progress=False)
    assert summary.rows == 60 and not list(out_dir.glob(f"*{TMP_MARKER}*"))
    assert read_manifest(manifest)["table"]["rows"] == 60


@pytest.mark.parametrize(
    ("kind", "style"), [("caption", None), ("interleaved", "base64"), ("interleaved", "members")]
)
def test_hostile_tars_give_one_row_per_reader_record(
    tmp_path: Path, scorer: Any, kind: str, style: str
) -> None:
    from tests import tarfixtures

    tar = tmp_path / "00000011.tar"
    if kind == "caption":
        expected = tarfixtures.write_hostile_caption_tar(tar)
    else:
        expected = tarfixtures.write_hostile_interleaved_tar(tar, style=style)
    out = tmp_path / "o" / "00000011.parquet"
    summary = score_tar(tar, scorer, out, kind=kind, source="s", config=CFG0, progress=False)
    rows = read_table(out)
    assert [r["key"] for r in rows] == [key for key, _ in expected]
    for row, (key, reason) in zip(rows, expected, strict=True):
        if reason is not None:
            assert (row["reason"], row["score"]) == (reason.value, None), key
            assert row["status"] == str(status_of(reason)), key
        elif row["status"] == "ok":
            assert row["score"] is not None and np.isfinite(row["score"]), key
    assert summary.rows == len(expected) and summary.by_status.get("ok", 0) >= 1


@pytest.mark.parametrize(("env", "drawn"), [("1", True), ("0", False)])
def test_engine_bar_follows_unifilter_progress(
    tmp_path: Path,
    scorer: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: str,
    drawn: bool,
) -> None:
    """The engine's bar is the project's progress bar: $UNIFILTER_PROGRESS forces it on or off."""
    monkeypatch.setenv("UNIFILTER_PROGRESS", env)
    tar = write_tar(tmp_path / "00000000.tar", caption_members(3))
    score_tar(
        tar, scorer, tmp_path / "00000000.parquet", kind="caption", source="s", config=CFG0, progress=True
    )
    err = capsys.readouterr().err
    assert ("00000000.tar" in err and "sample" in err) is drawn, err


def test_the_listing_walk_runs_beside_the_scoring(tmp_path: Path) -> None:
    from unifilter_core.data.listing import list_tar_samples
    from unifilter_core.scoring.outputs import listing_record, start_listing

    tar = write_tar(tmp_path / "00000000.tar", caption_members(6))
    walk = start_listing(tar)
    want = list_tar_samples(tar)
    assert walk.result(timeout=30).keys == want.keys and want.samples == 6
    keys = set(want.keys)
    record = listing_record(tar, keys - {sorted(keys)[0]}, walk)
    assert (record["samples"], record["missing_keys"], record["missing_examples"]) == (
        6,
        1,
        [sorted(keys)[0]],
    )
    gone = start_listing(tmp_path / "missing.tar")
    assert "FileNotFoundError" in listing_record(tmp_path / "missing.tar", set(), gone)["error"]
