"""Statistics recorded at scoring time: the per-source fine histogram stays the sum of the per-tar rows,
thresholds from it are exact to one bin, and a refresh ingests manifests in batches without reading tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unifilter_core.catalog import Catalog
from unifilter_core.catalog import ingest as ingest_module
from unifilter_core.catalog import stats as stats_module
from unifilter_core.catalog.schema import FINE_WIDTH, SCHEMA_VERSION
from unifilter_core.catalog.stats import compute_score_stats


def _table(
    root: Path, source: str, number: int, scores: list[float], fp: str = "m1", manifest: bool = True
) -> Path:
    """A score table as the engine writes it, and its manifest with the statistics."""
    path = root / "scores" / source / f"{number:08d}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = f"{source}_{number:04d}"
    n = len(scores) + 1
    pq.write_table(
        pa.table({
            "key": [f"{i:09d}" for i in range(n)], "source": [source] * n, "partition_key": [key] * n,
            "score": pa.array([*scores, None], pa.float32()), "status": ["ok"] * len(scores) + ["error"],
            "reason": [None] * len(scores) + ["image_decode_error"], "model_fingerprint": [fp] * n,
        }),
        path,
    )  # fmt: skip
    if manifest:
        doc = {"partition_key": key, "source": source, "stats": compute_score_stats(key, path).to_manifest()}
        path.with_name(f"{number:08d}.manifest.json").write_text(json.dumps(doc))
    return path


def _hist_matches_rows(catalog: Catalog) -> None:
    _, summed = catalog.query(
        "SELECT source, model_fingerprint, bin, sum(n) FROM (SELECT source, model_fingerprint, "
        "unnest(fine_bins) AS bin, unnest(fine_counts) AS n FROM score_stats) GROUP BY ALL ORDER BY ALL"
    )
    _, hist = catalog.query("SELECT source, model_fingerprint, bin, n FROM score_hist ORDER BY ALL")
    assert hist == summed


def test_score_hist_is_the_sum_of_the_rows_through_replace_and_delete(tmp_path: Path) -> None:
    catalog = Catalog(root=tmp_path)
    rng = np.random.default_rng(0)
    tables = [_table(tmp_path, "a", i, list(rng.uniform(0, 3, 20).round(4))) for i in range(3)]
    catalog.record_score_stats_many([(f"a_{i:04d}", t) for i, t in enumerate(tables)])
    _hist_matches_rows(catalog)
    assert catalog.query("SELECT sum(n) FROM score_hist")[1] == [(60,)]
    _table(tmp_path, "a", 1, [2.5, 2.5])  # rescored: its old bins leave the histogram
    catalog.record_score_stats("a_0001", tables[1])
    _hist_matches_rows(catalog)
    assert catalog.query("SELECT sum(n) FROM score_hist")[1] == [(42,)]
    catalog.delete_partition("a_0000")
    _hist_matches_rows(catalog)
    assert catalog.query("SELECT sum(n) FROM score_hist")[1] == [(22,)]


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 1.0])
def test_thresholds_from_statistics_are_exact_to_one_bin(tmp_path: Path, keep: float) -> None:
    catalog = Catalog(root=tmp_path)
    rng = np.random.default_rng(1)
    everything: dict[str, list[float]] = {"a": [], "b": []}
    pairs = []
    for source, centre in (("a", 1.0), ("b", 2.0)):
        for i in range(6):
            scores = list(np.clip(rng.normal(centre, 0.6, 50), -0.5, 3.5).astype(np.float32))
            everything[source] += scores
            pairs.append((f"{source}_{i:04d}", _table(tmp_path, source, i, [float(s) for s in scores])))
    catalog.record_score_stats_many(pairs)
    exact = {r.source: r for r in catalog.compute_threshold(keep_fraction=keep, method="exact", record=False)}
    stats = {r.source: r for r in catalog.compute_threshold(keep_fraction=keep, method="stats", record=False)}
    assert sorted(stats) == ["a", "b"]
    for source, row in stats.items():
        assert row.method == "stats" and exact[source].method == "exact"
        assert row.total == exact[source].total == 300
        assert exact[source].threshold - FINE_WIDTH - 1e-6 <= row.threshold <= exact[source].threshold + 1e-6
        assert row.kept == sum(1 for s in everything[source] if s >= row.threshold - 1e-7)
        assert row.kept >= math.ceil(keep * row.total)
        assert row.score_mean == pytest.approx(exact[source].score_mean, abs=1e-5)
    absolute = catalog.compute_threshold(absolute=1.5, method="stats", record=False)
    for row in absolute:
        true = sum(1 for s in everything[row.source] if s >= 1.5)
        near = sum(1 for s in everything[row.source] if 1.5 - FINE_WIDTH <= s < 1.5 + FINE_WIDTH)
        assert abs(row.kept - true) <= near
    with pytest.raises(ValueError, match="method must be one of"):
        catalog.compute_threshold(keep_fraction=0.3, method="guess")


def test_auto_is_exact_for_small_catalogs_and_statistics_beyond(tmp_path: Path, monkeypatch) -> None:
    import unifilter_core.catalog.core as core

    catalog = Catalog(root=tmp_path)
    catalog.record_score_stats_many(
        [(f"a_{i:04d}", _table(tmp_path, "a", i, [0.5, 1.5, 2.5])) for i in range(3)]
    )
    assert [r.method for r in catalog.compute_threshold(keep_fraction=0.3, record=False)] == ["exact"]
    monkeypatch.setattr(core, "EXACT_MAX_TABLES", 2)
    (row,) = catalog.compute_threshold(keep_fraction=0.3)
    assert row.method == "stats"
    assert catalog.query("SELECT method FROM thresholds")[1] == [("stats",)]


def test_refresh_ingests_manifests_in_batches_without_reading_tables(tmp_path: Path, monkeypatch) -> None:
    for i in range(5):
        _table(tmp_path, "a", i, [0.1 * i, 1.0 + i])
    _table(tmp_path, "a", 9, [2.0], manifest=False)  # an old table without statistics: computed from parquet
    catalog = Catalog(root=tmp_path)
    computed: list[str] = []
    real = stats_module.compute_score_stats
    monkeypatch.setattr(
        stats_module, "compute_score_stats", lambda key, path: computed.append(key) or real(key, path)
    )
    writes: list[int] = []
    real_ingest = Catalog.ingest_stats
    monkeypatch.setattr(
        Catalog,
        "ingest_stats",
        lambda self, stats, **kw: writes.append(len(stats)) or real_ingest(self, stats, **kw),
    )
    monkeypatch.setattr(ingest_module, "BATCH", 2)
    done = catalog.refresh()
    assert done["score_stats"] == 6 and computed == ["a_0009"]
    assert writes == [2, 2, 2, 0]  # batches of two, one transaction each
    _hist_matches_rows(catalog)
    assert catalog.refresh()["score_stats"] == 0  # nothing new: nothing read


def test_a_version_1_catalog_is_upgraded_and_its_rows_recomputed(tmp_path: Path) -> None:
    catalog = Catalog(root=tmp_path)
    catalog.record_score_stats("a_0000", _table(tmp_path, "a", 0, [0.5, 2.5]))
    conn = duckdb.connect(str(catalog.path))  # as version 1 left it: no fine bins, no score_hist, no method
    conn.execute("ALTER TABLE score_stats DROP COLUMN fine_bins")
    conn.execute("ALTER TABLE score_stats DROP COLUMN fine_counts")
    conn.execute("ALTER TABLE thresholds DROP COLUMN method")
    conn.execute("DROP TABLE score_hist")
    conn.execute("DROP TABLE score_drift")
    conn.execute("DELETE FROM schema_version WHERE version >= 2")
    conn.close()
    upgraded = Catalog(root=tmp_path)
    assert upgraded.query("SELECT max(version) FROM schema_version")[1] == [(SCHEMA_VERSION,)]
    assert upgraded.query("SELECT fine_bins FROM score_stats")[1] == [(None,)]
    assert upgraded.refresh()["score_stats"] == 1  # the row without fine bins is recomputed
    _hist_matches_rows(upgraded)
    assert upgraded.query("SELECT sum(n) FROM score_hist")[1] == [(2,)]


def test_cdf_quantiles_from_statistics_follow_the_exact_ones(tmp_path: Path) -> None:
    from unifilter_core.partition_steps import score_quantiles_by_source

    catalog = Catalog(root=tmp_path)
    rng = np.random.default_rng(2)
    pairs = [
        (f"a_{i:04d}", _table(tmp_path, "a", i, [float(x) for x in rng.uniform(0, 3, 200)])) for i in range(4)
    ]
    catalog.record_score_stats_many(pairs)
    catalog.refresh_scores_view()
    exact = score_quantiles_by_source(catalog, points=11)["a"]
    stats = score_quantiles_by_source(catalog, points=11, method="stats")["a"]
    assert stats == pytest.approx(exact, abs=2 * FINE_WIDTH)


def test_the_engine_s_statistics_equal_the_table_s(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """What the engine records in a manifest (from memory) is what DuckDB computes from the table."""
    from dataclasses import asdict

    from tests.tarfixtures import caption_members, jpeg_bytes, write_tar
    from unifilter_core.scorer import load_scorer
    from unifilter_core.scoring import score_tar

    members = []
    for i in range(40):
        members += caption_members(
            f"{i:09d}", image=jpeg_bytes(color=(i * 5, 20, 90)), text=f"photo {i} " * (i % 7)
        )
    members += caption_members("broken", image=b"not a jpeg", text="x")
    tar = write_tar(tmp_path / "00000000.tar", members)
    table = tmp_path / "out" / "00000000.parquet"
    score_tar(tar, load_scorer(tiny_checkpoint), table, kind="caption", source="s", progress=False)
    manifest = json.loads((tmp_path / "out" / "00000000.manifest.json").read_text())
    recorded = manifest["stats"]
    computed = asdict(compute_score_stats("s_0000", table))
    assert (
        recorded["n_rows"] == 41 and recorded["n_error"] >= 1 and recorded["reasons"] == computed["reasons"]
    )
    for name, value in recorded.items():
        if isinstance(value, float):
            assert value == pytest.approx(computed[name], rel=1e-6, abs=1e-7), name
        else:
            assert value == computed[name], name
