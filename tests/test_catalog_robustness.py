"""Catalog robustness: stats keyed by the partition key a table records, unreadable score tables left out
(with a warning) of the scores view, the thresholds and ``catalog refresh`` instead of failing them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tests.test_catalog import count, tar, write_scores
from unifilter_core.catalog import Catalog
from unifilter_core.cli import main as cli_main


def _moved(root: Path, source: str, num: int, folder: str, scores: list[float]) -> Path:
    """A table of ``source`` written into ``scores/<folder>/`` (as ``--output-dir`` or ``--source`` make)."""
    path = write_scores(root, source, num, scores)
    target = root / "scores" / folder / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    return target


def test_refresh_keys_stats_by_the_recorded_partition_key(tmp_path: Path, capsys) -> None:
    cat = Catalog(root=tmp_path)
    cat.register_tars([tar("datacomp", n) for n in range(4)])
    for n in range(3):
        _moved(tmp_path, "datacomp", n, "shards", [0.5, 1.5])
    bare = _moved(tmp_path, "datacomp", 3, "shards", [2.0])  # no partition_key column: the manifest has it
    pq.write_table(pq.read_table(bare).drop(["partition_key"]), bare)
    bare.with_name("00000003.manifest.json").write_text(
        json.dumps({"partition_key": "datacomp_0003", "source": "datacomp"})
    )
    assert cli_main(["catalog", "refresh", "--root", str(tmp_path)]) == 0
    assert "4 score table(s) summarised" in capsys.readouterr().out
    keys = [r[0] for r in cat.query("SELECT partition_key FROM score_stats ORDER BY 1")[1]]
    assert keys == [f"datacomp_{n:04d}" for n in range(4)]
    assert cat.query("SELECT n_tars, n_scored, n_rows FROM sources")[1] == [(4, 4, 7)]


def test_refresh_falls_back_to_the_source_column_and_file_name(tmp_path: Path) -> None:
    cat = Catalog(root=tmp_path)
    path = _moved(tmp_path, "obelics", 5, "out", [1.0])
    pq.write_table(pq.read_table(path).drop(["partition_key"]), path)
    assert cat.refresh()["score_stats"] == 1
    assert cat.score_stats("obelics_0005") is not None


def _corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 not really parquet")
    return path


def test_unreadable_table_is_left_out_with_a_warning(tmp_path: Path, capsys) -> None:
    cat = Catalog(root=tmp_path)
    write_scores(tmp_path, "datacomp", 0, [0.5, 1.0, 2.0, 2.5])
    bad = _corrupt(tmp_path / "scores" / "datacomp" / "00000001.parquet")
    done = cat.refresh()
    assert done["score_stats"] == 1 and len(done["unreadable"]) == 1 and str(bad) in done["unreadable"][0]
    assert count(cat, "SELECT count(*) FROM scores") == 4
    rows = cat.compute_threshold(keep_fraction=0.5, record=False)
    assert [(r.source, r.kept, r.total) for r in rows] == [("datacomp", 2, 4)]
    assert cat.score_files().bad[0][0] == str(bad)

    assert cli_main(["thresholds", "--root", str(tmp_path), "--keep", "0.5"]) == 0
    out = capsys.readouterr()
    assert "datacomp" in out.out and "1 unreadable score table(s) left out" in out.err and str(bad) in out.err
    assert cli_main(["catalog", "refresh", "--root", str(tmp_path)]) == 0
    assert str(bad) in capsys.readouterr().err


def test_query_survives_a_table_that_goes_bad_after_the_view_was_built(tmp_path: Path) -> None:
    cat = Catalog(root=tmp_path)
    write_scores(tmp_path, "datacomp", 0, [0.5, 1.0])
    later = write_scores(tmp_path, "datacomp", 1, [2.0])
    cat.refresh_scores_view()
    assert count(cat, "SELECT count(*) FROM scores") == 3
    _corrupt(later)
    assert count(cat, "SELECT count(*) FROM scores") == 2


def test_view_reads_tables_with_and_without_the_new_columns(tmp_path: Path) -> None:
    cat = Catalog(root=tmp_path)
    write_scores(tmp_path, "datacomp", 0, [0.5])
    newer = write_scores(tmp_path, "datacomp", 1, [1.5])
    extra = {"flags": pa.array([["text_escaped"]]), "quality_class": pa.array([2], pa.int32()),
             "expected_level": pa.array([1.4], pa.float32())}  # fmt: skip
    table = pq.read_table(newer)
    for name, column in extra.items():
        table = table.append_column(name, column)
    pq.write_table(table, newer)
    _corrupt(tmp_path / "scores" / "datacomp" / "00000002.parquet")
    cat.refresh()
    assert count(cat, "SELECT count(*) FROM scores") == 2
