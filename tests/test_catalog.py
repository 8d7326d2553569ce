"""Tests of the DuckDB catalog (unifilter_core.catalog) and the `unifilter thresholds` / `catalog` CLI."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.catalog_pause import PAUSE_ENV
from unifilter_core.catalog import Catalog, TarRecord
from unifilter_core.cli import main as cli_main

EVIL = "x'; DROP TABLE tars; --"


def write_scores(
    root: Path,
    source: str,
    num: int,
    scores: list[float | None],
    statuses: list[str] | None = None,
    fp: str = "m1",
) -> Path:
    """A score parquet with the shared score-table columns; None scores default to status 'error'."""
    n = len(scores)
    statuses = statuses or ["ok" if s is not None else "error" for s in scores]
    reasons = [
        None if st == "ok" else ("too_many_images" if st == "skipped" else "image_decode_error")
        for st in statuses
    ]
    table = pa.table(
        {
            "key": [f"{num:08d}_{i:04d}" for i in range(n)],
            "source": [source] * n,
            "partition_key": [f"{source}_{num:04d}"] * n,
            "uid": [f"uid{i}" for i in range(n)],
            "url": [None] * n,
            "score": pa.array(scores, pa.float32()),
            "status": statuses,
            "reason": reasons,
            "n_images": pa.array([1] * n, pa.int32()),
            "n_tokens": pa.array([10] * n, pa.int32()),
            "truncated": [False] * n,
            "model_fingerprint": [fp] * n,
            "detail": [None] * n,
        }
    )
    path = root / "scores" / source / f"{num:08d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def tar(source: str, num: int, **kw: object) -> TarRecord:
    return TarRecord(
        partition_key=f"{source}_{num:04d}", source=source, path=f"sources/{source}/{num:08d}.tar", **kw
    )


@pytest.fixture()
def cat(tmp_path: Path) -> Catalog:
    return Catalog(root=tmp_path)


def count(c: Catalog, sql: str, params: list | None = None) -> int:
    return c.query(sql, params)[1][0][0]


# -- schema -----------------------------------------------------------------------------------------------------


def test_schema_is_idempotent_and_scores_view_empty(tmp_path: Path) -> None:
    c1 = Catalog(root=tmp_path)
    c2 = Catalog(root=tmp_path)
    c2.ensure_schema()
    assert count(c1, "SELECT count(*) FROM schema_version") == 1
    tables = {r[0] for r in c1.query("SELECT table_name FROM information_schema.tables")[1]}
    assert {
        "tars",
        "lineage",
        "lineage_history",
        "score_stats",
        "thresholds",
        "generation_ledger",
        "scores",
    } <= tables
    cols, rows = c1.query("SELECT * FROM scores")
    assert rows == []
    assert cols == ["key", "source", "partition_key", "uid", "url", "score", "status", "reason", "n_images",
                    "n_tokens", "truncated", "model_fingerprint", "flags", "quality_class", "expected_level"]  # fmt: skip


def test_missing_catalog_without_create_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no catalog"):
        Catalog(root=tmp_path, create=False)


# -- registry, lineage ------------------------------------------------------------------------------------------


def test_register_tars_upserts(cat: Catalog) -> None:
    cat.register_tars([tar("obelics", 42, size_bytes=10, fingerprint="a"), tar("datacomp", 12345)])
    first = cat.query("SELECT registered_at FROM tars WHERE partition_key = 'obelics_0042'")[1][0][0]
    cat.register_tars([tar("obelics", 42, size_bytes=20, fingerprint="b", mtime=0.0)])
    rows = cat.query("SELECT partition_key, size_bytes, fingerprint, registered_at FROM tars ORDER BY 1")[1]
    assert [r[0] for r in rows] == ["datacomp_12345", "obelics_0042"]
    assert rows[1][1:3] == (20, "b") and rows[1][3] == first
    with pytest.raises(ValueError, match="unknown tar fields"):
        cat.register_tars([{"partition_key": "a_0001", "source": "a", "path": "p", "colour": 1}])


def test_lineage_latest_and_history(cat: Catalog) -> None:
    cat.record_lineage("scores", "obelics_0042", "run1", status="success", row_count=5, started_at=0.0)
    cat.record_lineage("scores", "obelics_0042", "run2", status="success", row_count=6)
    cat.record_lineage(
        "scores", "obelics_0042", "run2", status="success", row_count=7
    )  # same run recorded twice
    cat.record_lineage("quality_threshold", None, "run3", status="success")
    cat.record_lineage("quality_threshold", None, "run4", status="failure")
    latest = cat.query("SELECT asset_key, partition_key, run_id, row_count FROM lineage ORDER BY 1")[1]
    assert latest == [("quality_threshold", None, "run4", None), ("scores", "obelics_0042", "run2", 7)]
    assert count(cat, "SELECT count(*) FROM lineage_history") == 4
    with pytest.raises(ValueError):
        cat.record_lineage("scores", "p", "", status="success")


# -- score stats ------------------------------------------------------------------------------------------------


def test_score_stats_values_and_replacement(cat: Catalog, tmp_path: Path) -> None:
    p = write_scores(
        tmp_path,
        "obelics",
        42,
        [0.05, 1.05, 2.05, 3.5, None, 1.0],
        ["ok", "ok", "ok", "ok", "error", "skipped"],
    )
    cat.register_tars([tar("obelics", 42)])
    s = cat.record_score_stats("obelics_0042", p)
    assert (s.n_rows, s.n_ok, s.n_skipped, s.n_error) == (6, 4, 1, 1)
    assert s.mean == pytest.approx((0.05 + 1.05 + 2.05 + 3.5) / 4, abs=1e-6)
    assert s.min == pytest.approx(0.05) and s.max == pytest.approx(3.5)
    assert s.p50 == pytest.approx((1.05 + 2.05) / 2, abs=1e-6)  # quantile_cont over the 4 ok scores
    assert sum(s.histogram) == 4 and s.histogram[0] == 1 and s.histogram[10] == 1 and s.histogram[20] == 1
    assert s.histogram[-1] == 1  # 3.5 clamps into the last bin
    assert s.reasons == {"image_decode_error": 1, "too_many_images": 1}
    row = cat.score_stats("obelics_0042")
    assert row["reasons"] == {"image_decode_error": 1, "too_many_images": 1} and len(row["hist_edges"]) == 31
    assert count(cat, "SELECT count(*) FROM scores") == 6

    write_scores(tmp_path, "obelics", 42, [2.0, 2.0], fp="m2")  # re-materialized with another model
    cat.record_score_stats("obelics_0042", p)
    assert count(cat, "SELECT count(*) FROM score_stats") == 1
    assert cat.score_stats("obelics_0042")["n_rows"] == 2
    assert cat.stale_partitions("m2") == [] and cat.stale_partitions("m1") == ["obelics_0042"]


def test_score_stats_of_empty_and_missing_tables(cat: Catalog, tmp_path: Path) -> None:
    s = cat.record_score_stats("a_0001", write_scores(tmp_path, "a", 1, []))
    assert (s.n_rows, s.n_ok, s.mean, s.p50, sum(s.histogram), s.reasons) == (0, 0, None, None, 0, {})
    s = cat.record_score_stats("a_0002", write_scores(tmp_path, "a", 2, [None, None]))
    assert (s.n_rows, s.n_error, s.mean) == (2, 2, None)
    with pytest.raises(FileNotFoundError, match="score the tar first"):
        cat.record_score_stats("a_0003", tmp_path / "nope.parquet")
    assert count(cat, "SELECT count(*) FROM score_stats") == 2


def test_stale_missing_and_delete(cat: Catalog, tmp_path: Path) -> None:
    cat.register_tars([tar("obelics", 1), tar("obelics", 2), tar("datacomp", 3)])
    p1 = write_scores(tmp_path, "obelics", 1, [1.0], fp="new")
    cat.record_score_stats("obelics_0001", p1)
    cat.record_score_stats("datacomp_0003", write_scores(tmp_path, "datacomp", 3, [1.0], fp="old"))
    assert cat.missing_partitions() == ["obelics_0002"]
    assert cat.stale_partitions("new") == ["datacomp_0003", "obelics_0002"]
    assert cat.stale_partitions("new", source="obelics") == ["obelics_0002"]
    cat.record_lineage("scores", "obelics_0001", "r", status="success")
    p1.unlink()
    (tmp_path / "scores" / "datacomp" / "00000003.parquet").unlink()
    cat.delete_partition("obelics_0001")
    assert count(cat, "SELECT count(*) FROM score_stats WHERE partition_key = 'obelics_0001'") == 0
    assert (
        count(cat, "SELECT count(*) FROM lineage") == 0
        and count(cat, "SELECT count(*) FROM lineage_history") == 1
    )
    assert count(cat, "SELECT count(*) FROM tars") == 2
    assert count(cat, "SELECT count(*) FROM scores") == 0  # view fell back to empty, no "No files found"


# -- thresholds -------------------------------------------------------------------------------------------------


def test_thresholds_hand_computed(cat: Catalog, tmp_path: Path) -> None:
    write_scores(tmp_path, "a", 1, [0.1, 0.2, 0.3, 0.4, 0.5, None])  # 'a' spread over two tars
    write_scores(tmp_path, "a", 2, [0.6, 0.7, 0.8, 0.9, 1.0], ["ok", "ok", "ok", "ok", "ok"])
    write_scores(tmp_path, "b", 1, [1.0, 1.0, 1.0, 2.0, 5.0], ["ok", "ok", "ok", "ok", "skipped"])
    rows = {r.source: r for r in cat.compute_threshold(keep_fraction=0.3)}
    # a: 10 ok scores, k = ceil(3.0) = 3 -> third highest = 0.8; b: 4 ok, k = ceil(1.2) = 2 -> 1.0, ties keep 4
    assert rows["a"].threshold == pytest.approx(0.8) and (rows["a"].kept, rows["a"].total) == (3, 10)
    assert rows["b"].threshold == pytest.approx(1.0) and (rows["b"].kept, rows["b"].total) == (4, 4)
    assert rows["a"].kept_share == pytest.approx(0.3)
    only_b = cat.compute_threshold(source="b", keep_fraction=0.25, record=False)
    assert [(r.source, r.threshold, r.kept) for r in only_b] == [("b", 2.0, 1)]
    absolute = {r.source: r for r in cat.compute_threshold(absolute=0.55)}
    assert (absolute["a"].kept, absolute["b"].kept, absolute["a"].mode) == (5, 4, "absolute")
    assert absolute["a"].keep_fraction is None
    rec = cat.query("SELECT source, mode, keep_fraction, threshold, kept, total FROM thresholds ORDER BY id")[
        1
    ]
    assert len(rec) == 4 and rec[0][:2] == ("a", "keep_fraction") and rec[2][1] == "absolute"
    assert len({r[0] for r in cat.query("SELECT selection_id FROM thresholds")[1]}) == 2
    default = cat.compute_threshold(record=False)
    assert default[0].keep_fraction == 0.3


@pytest.mark.parametrize(
    "kwargs",
    [{"keep_fraction": 0.0}, {"keep_fraction": 1.5}, {"keep_fraction": -0.1}, {"keep_fraction": math.nan},
     {"absolute": math.inf}, {"absolute": math.nan}, {"keep_fraction": 0.3, "absolute": 1.0}],
)  # fmt: skip
def test_threshold_validation(cat: Catalog, tmp_path: Path, kwargs: dict) -> None:
    write_scores(tmp_path, "a", 1, [0.1, 0.2])
    with pytest.raises(ValueError):
        cat.compute_threshold(**kwargs)
    assert count(cat, "SELECT count(*) FROM thresholds") == 0


def test_keep_one_keeps_everything(cat: Catalog, tmp_path: Path) -> None:
    write_scores(tmp_path, "a", 1, [0.3, 0.1, 0.2])
    (row,) = cat.compute_threshold(keep_fraction=1.0, record=False)
    assert row.threshold == pytest.approx(0.1) and row.kept == row.total == 3


# -- injection safety -------------------------------------------------------------------------------------------


def test_hostile_source_names_are_parameters(tmp_path: Path) -> None:
    root = tmp_path / "it's a root"  # a quote in the data root goes into the view's quoted literal
    cat = Catalog(root=root)
    cat.register_tars([TarRecord(partition_key=EVIL + "_0001", source=EVIL, path="p")])
    p = write_scores(root, "evil", 1, [0.5, 1.5])
    t = pq.read_table(p).to_pydict()
    t["source"] = [EVIL, EVIL]
    pq.write_table(pa.table(t), p)
    cat.record_score_stats(EVIL + "_0001", p)
    cat.record_lineage(EVIL, EVIL, EVIL, status=EVIL)
    (row,) = cat.compute_threshold(source=EVIL, keep_fraction=0.5)
    assert row.source == EVIL and row.kept == 1
    assert cat.stale_partitions(EVIL, source=EVIL) == [EVIL + "_0001"]
    assert cat.missing_partitions(source=EVIL) == []
    assert count(cat, "SELECT count(*) FROM tars WHERE source = ?", [EVIL]) == 1
    assert count(cat, "SELECT count(*) FROM scores WHERE source = ?", [EVIL]) == 2
    assert cat.compute_threshold(source="nobody", record=False) == []
    with pytest.raises(ValueError, match="glob"):
        Catalog(root=tmp_path / "a[1]")


# -- generation ledger ------------------------------------------------------------------------------------------


def test_ledger_ingestion_latest_event_and_torn_line(cat: Catalog, tmp_path: Path) -> None:
    ledger = tmp_path / "synthetic" / "caption" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    events = [
        {"request_id": "r1", "model": "claude-x", "mode": "batch", "status": "submitted", "batch_id": "b1",
         "attempts": 1, "timestamp": "2025-01-01T00:00:00Z"},
        {"request_id": "r2", "model": "claude-x", "mode": "sync", "status": "succeeded", "input_tokens": 100,
         "output_tokens": 50, "cache_read_input_tokens": 7, "cost_usd": 0.01, "timestamp": 1735689600.0},
        {"request_id": "r1", "model": "claude-x", "mode": "batch", "status": "succeeded", "batch_id": "b1",
         "attempts": 2, "input_tokens": 10, "output_tokens": 5, "cost_usd": 0.002,
         "timestamp": "2025-01-01T00:05:00+00:00"},
        {"request_id": EVIL, "kind": "caption", "model": "m", "mode": "sync", "status": "failed",
         "error_type": "overloaded", "detail": "529 from the API", "prompt_version": "v1"},
    ]  # fmt: skip
    text = "".join(json.dumps(e) + "\n" for e in events) + "not json\n"
    ledger.write_text(text + json.dumps({"request_id": "r3", "status": "succeeded"}))  # torn: no newline
    assert cat.ingest_ledgers() == 3
    assert cat.ingest_ledger(ledger) == 3  # idempotent
    rows = cat.query(
        "SELECT request_id, kind, status, attempts, input_tokens, cost_usd, timestamp FROM generation_ledger "
        "ORDER BY request_id"
    )[1]
    assert len(rows) == 3
    r1 = next(r for r in rows if r[0] == "r1")
    assert r1[1:6] == ("caption", "succeeded", 2, 10, 0.002) and r1[6].minute == 5
    totals = cat.query(
        "SELECT n_events, total_input_tokens, total_cost_usd FROM generation_ledger WHERE request_id = 'r1'"
    )
    assert totals[1] == [(2, 10, pytest.approx(0.002))]
    r2 = next(r for r in rows if r[0] == "r2")
    assert r2[6].year == 2025 and r2[6].hour == 0
    evil = cat.query(
        "SELECT error, error_detail, prompt_version FROM generation_ledger WHERE request_id = ?", [EVIL]
    )
    assert evil[1] == [("overloaded", "529 from the API", "v1")]
    with ledger.open("a") as fh:  # the generator cuts the torn line and appends: r3 now complete
        fh.write("\n" + json.dumps({"request_id": "r1", "status": "failed", "attempts": 3}) + "\n")
    assert cat.ingest_ledger(ledger) == 4
    assert count(cat, "SELECT attempts FROM generation_ledger WHERE request_id = 'r1'") == 3


# -- concurrency and crashes ------------------------------------------------------------------------------------


def _worker(root: str, source: str, n_tars: int) -> None:
    cat = Catalog(root=root, lock_timeout=60)
    for num in range(n_tars):
        cat.register_tars([tar(source, num, size_bytes=num)])
        p = write_scores(Path(root), source, num, [0.1 * num, 1.0, None])
        for attempt in range(2):  # re-materialization must replace, not duplicate
            cat.record_score_stats(f"{source}_{num:04d}", p)
            cat.record_lineage(
                "scores", f"{source}_{num:04d}", f"run-{source}-{num}-{attempt}", status="success"
            )
    cat.compute_threshold(source=source, keep_fraction=0.5)


@pytest.mark.slow
def test_concurrent_writer_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), f"src{i}", 3)) for i in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 6
    cat = Catalog(root=tmp_path)
    assert count(cat, "SELECT count(*) FROM tars") == 18
    assert count(cat, "SELECT count(*) FROM score_stats") == 18
    assert count(cat, "SELECT count(*) FROM lineage") == 18
    assert count(cat, "SELECT count(*) FROM lineage_history") == 36
    assert count(cat, "SELECT count(*) FROM thresholds") == 6
    assert count(cat, "SELECT count(*) FROM scores") == 54
    assert cat.missing_partitions() == []


def _run_paused(root: Path, stage: str, code: str) -> None:
    """Start a writer that pauses at ``stage`` inside its transaction, then SIGKILL it."""
    marker = root / f"paused-{stage}"
    repo = str(Path(__file__).resolve().parents[1])  # the child imports tests.catalog_pause
    env = {**os.environ, PAUSE_ENV: f"{stage}:{marker}", "PYTHONPATH": repo}
    proc = subprocess.Popen([sys.executable, "-c", "import tests.catalog_pause\n" + code], env=env)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None, "writer exited before reaching the pause point"
        assert time.monotonic() < deadline, "writer never reached the pause point"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)


def test_sigkilled_writer_leaves_old_rows_and_rerun_completes(tmp_path: Path) -> None:
    cat = Catalog(root=tmp_path)
    p = write_scores(tmp_path, "obelics", 1, [1.0, 2.0])
    cat.register_tars([tar("obelics", 1)])
    cat.record_score_stats("obelics_0001", p)
    write_scores(tmp_path, "obelics", 1, [3.0, 3.0, 3.0])
    code = (
        "from unifilter_core.catalog import Catalog; "
        f"Catalog(root={str(tmp_path)!r}).record_score_stats('obelics_0001', {str(p)!r})"
    )
    _run_paused(tmp_path, "score_stats_mid", code)  # killed after DELETE, before INSERT
    assert cat.score_stats("obelics_0001")["n_rows"] == 2  # old row intact, lock released by the kernel
    reg = (
        "from unifilter_core.catalog import Catalog, TarRecord; Catalog(root="
        + repr(str(tmp_path))
        + ").register_tars("
        "[TarRecord(f'new_{i:04d}', 'new', 'p') for i in range(6)])"
    )
    _run_paused(tmp_path, "register_tars_mid", reg)  # killed with half of the rows inserted
    assert count(cat, "SELECT count(*) FROM tars WHERE source = 'new'") == 0
    cat.record_score_stats("obelics_0001", p)  # rerun
    assert cat.score_stats("obelics_0001")["n_rows"] == 3
    assert count(cat, "SELECT count(*) FROM score_stats") == 1


def test_write_retries_while_another_tool_holds_the_file(tmp_path: Path) -> None:
    cat = Catalog(root=tmp_path)
    marker = tmp_path / "held"
    code = (
        "import duckdb, pathlib, time, sys; c = duckdb.connect(sys.argv[1], read_only=True); "
        "pathlib.Path(sys.argv[2]).touch(); time.sleep(1.5); c.close()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(cat.path), str(marker)])
    while not marker.exists():
        assert proc.poll() is None
        time.sleep(0.02)
    cat.register_tars([tar("obelics", 7)])  # DuckDB refuses the file for ~1.5 s: retried, not raised
    proc.wait(10)
    assert count(cat, "SELECT count(*) FROM tars") == 1


# -- CLI --------------------------------------------------------------------------------------------------------


def test_cli_thresholds_table_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    assert cli_main(["thresholds", "--root", root]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unifilter: error: no catalog") and "\n" not in err
    Catalog(root=tmp_path)
    assert cli_main(["thresholds", "--root", root]) == 2
    assert "no scored samples" in capsys.readouterr().err
    write_scores(tmp_path, "obelics", 1, [0.1 * i for i in range(1, 11)])
    assert cli_main(["thresholds", "--root", root, "--keep", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["source", "mode", "threshold", "kept", "total", "kept_share"]
    assert out[1].split() == ["obelics", "keep_fraction", "0.8000", "3", "10", "30.0%"]
    assert cli_main(["thresholds", "--root", root, "--absolute", "0.45", "--json", "--record"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["source"], row["kept"], row["total"], row["mode"]) == ("obelics", 6, 10, "absolute")
    for bad in (["--keep", "1.5"], ["--keep", "0"], ["--absolute", "nan"]):
        assert cli_main(["thresholds", "--root", root, *bad]) == 2
        assert capsys.readouterr().err.startswith("unifilter: error:")
    assert count(Catalog(root=tmp_path), "SELECT count(*) FROM thresholds") == 1


def test_cli_catalog_sql_and_refresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    write_scores(tmp_path, "obelics", 42, [1.0, None])
    ledger = tmp_path / "synthetic" / "interleaved" / "ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"request_id": "q", "status": "succeeded"}) + "\n")
    assert cli_main(["catalog", "refresh", "--root", root]) == 0
    assert "1 score table(s) summarised, 1 ledger request(s)" in capsys.readouterr().out
    assert (
        cli_main(["catalog", "sql", "--root", root, "--json", "SELECT partition_key, n_ok FROM score_stats"])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [{"partition_key": "obelics_0042", "n_ok": 1}]
    assert (
        cli_main(
            [
                "catalog",
                "sql",
                "--root",
                root,
                "SELECT status, count(*) AS n FROM scores GROUP BY 1 ORDER BY 1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["status\tn", "error\t1", "ok\t1"]
    assert cli_main(["catalog", "sql", "--root", root, "DROP TABLE tars"]) == 2
    assert "read-only" in capsys.readouterr().err
    assert count(Catalog(root=tmp_path), "SELECT count(*) FROM tars") == 0  # table still there
    assert cli_main(["catalog", "refresh", "--root", root]) == 0
    assert "0 score table(s)" in capsys.readouterr().out  # unchanged parquet not summarised again
