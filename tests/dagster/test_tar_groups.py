"""Tar-group partitions through Dagster: one run scores a group's tars with one model load, per-tar tables,
manifests and statistics; the sensor, the schedule and the filtered tars work on groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
from dagster_duckdb import DuckDBResource

from tests.dagster.test_automation import schedule_tick, sensor_tick
from tests.reliability.conftest import failure_message, materialize
from tests.tarfixtures import write_caption_tar
from unifilter_core.catalog import Catalog
from unifilter_core.scorer import models_loaded
from unifilter_dagster.assets.tars import filtered_dataset, quality_threshold, scores, tar_manifest
from unifilter_dagster.resources import ScoringModelResource, SourceConfig, UniFilterHome


def _resources(root: Path, ckpt: Path, group_size: int = 4, **scoring: Any) -> dict[str, Any]:
    opts = {"device": "cpu", "num_workers": 0, "batch_size": 4, **scoring}
    return {
        "home": UniFilterHome(root=str(root), use_world=False,
                              sources=[SourceConfig(name="cap", kind="caption", group_size=group_size)]),
        "duckdb": DuckDBResource(database=str(root / "unifilter.duckdb")),
        "scoring_model": ScoringModelResource(checkpoint=str(ckpt), **opts),
    }  # fmt: skip


def _tars(root: Path, ids: list[int]) -> None:
    for i in ids:
        write_caption_tar(root / "sources" / "cap" / f"{i:08d}.tar", n=3 + i % 2)


def _meta(result: Any, asset: str = "scores") -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def test_a_group_partition_scores_its_tars_with_one_model_load(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = tmp_path / "root"
    _tars(root, [0, 1, 2, 3, 4, 5])
    resources = _resources(root, tiny_checkpoint)
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        assert sorted(instance.get_dynamic_partitions("tars")) == ["cap_0000-0003", "cap_0004-0007"]
        loads = models_loaded()
        first = materialize([scores], resources, instance, "cap_0000-0003")
        assert first.success, failure_message(first)
        assert models_loaded() == loads + 1  # four tars, one model
        meta = _meta(first)
        assert meta["tars"] == 4 and meta["rows"] == 3 + 4 + 3 + 4 and meta["resumed"] is False
        tables = sorted((root / "scores" / "cap").glob("*.parquet"))
        assert [t.name for t in tables] == [f"{i:08d}.parquet" for i in range(4)]
        for i, table in enumerate(tables):  # each table is its own tar's, keyed by the tar
            assert set(pq.read_table(table).column("partition_key").to_pylist()) == {f"cap_{i:04d}"}
        catalog = Catalog(root / "unifilter.duckdb", root=root)
        stats = catalog.query("SELECT partition_key, n_rows FROM score_stats ORDER BY 1")[1]
        assert stats == [("cap_0000", 3), ("cap_0001", 4), ("cap_0002", 3), ("cap_0003", 4)]
        checks = {c.check_name: c.passed for c in first.get_asset_check_evaluations()}
        assert checks == {
            "one_row_per_sample": True,
            "scores_finite_in_range": True,
            "score_drift": True,
            "scorer_canary": True,
        }

        again = materialize([scores], resources, instance, "cap_0000-0003")
        assert again.success and models_loaded() == loads + 1  # every tar resumed from its manifest
        assert _meta(again)["resumed"] is True and _meta(again)["resumed_tars"] == 4

        (root / "scores" / "cap" / "00000002.parquet").unlink()  # one table lost: only that tar is rescored
        before = {t.name: t.stat().st_mtime_ns for t in tables if t.exists()}
        third = materialize([scores], resources, instance, "cap_0000-0003")
        assert third.success and models_loaded() == loads + 2
        assert _meta(third)["resumed_tars"] == 3
        assert {t.name: t.stat().st_mtime_ns for t in tables if t.name != "00000002.parquet"} == before
        assert (root / "scores" / "cap" / "00000002.parquet").is_file()

        last = materialize([scores], resources, instance, "cap_0004-0007")  # a group with two tars so far
        assert last.success and _meta(last)["tars"] == 2

        assert materialize([quality_threshold], resources, instance).success
        filtered = materialize([filtered_dataset], resources, instance, "cap_0000-0003")
        assert filtered.success, failure_message(filtered)
        assert _meta(filtered, "filtered_dataset")["tars"] == 4
        assert sorted(p.name for p in (root / "filtered" / "cap").glob("*.tar")) == [
            f"{i:08d}.tar" for i in range(4)
        ]
        _check_card(root, catalog)


def _check_card(root: Path, catalog: Catalog) -> None:
    """The dataset card's front matter parses and its counts are the catalog's."""
    import json

    from unifilter_core.cli import main
    from unifilter_core.dataset_card import read_front_matter

    card = root / "filtered" / "cap" / "README.md"
    text = card.read_text()
    front = read_front_matter(text)
    assert front["license"] == "other" and front["task_categories"] == ["image-to-text", "text-to-image"]
    figures = front["unifilter"]
    (samples, ok, tars), = catalog.query(
        "SELECT sum(n_rows), sum(n_ok), count(*) FROM score_stats WHERE source = 'cap'")[1]  # fmt: skip
    threshold = json.loads((root / "thresholds.json").read_text())["cap"]
    assert (figures["samples"], figures["ok"], figures["tars_scored"]) == (samples, ok, tars) == (21, 21, 6)
    assert figures["kept"] == threshold["kept"] and figures["threshold"] == threshold["threshold"]
    assert figures["removed"] == samples - threshold["kept"] == sum(figures["removed_by_reason"].values())
    assert figures["removed_by_reason"]["below_threshold"] == ok - threshold["kept"]
    assert front["size_categories"] == ["n<1K"] and "## Lineage" in text and "`cap_0003`" in text
    card.unlink()
    assert main(["catalog", "card", "cap", "--root", str(root)]) == 0  # the CLI writes the same card
    assert card.read_text() == text


def test_a_tar_that_fails_in_a_group_keeps_the_others(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unifilter_core.scoring.engine as engine

    root = tmp_path / "root"
    _tars(root, [0, 1, 2])
    real = engine.tar_fingerprint

    def failing(tar: Any) -> Any:  # an I/O error on one tar of the group
        if Path(str(tar)).name == "00000001.tar":
            raise OSError("input/output error reading 00000001.tar")
        return real(tar)

    monkeypatch.setattr(engine, "tar_fingerprint", failing)
    resources = _resources(root, tiny_checkpoint)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tars", ["cap_0000-0003"])
        result = materialize([scores], resources, instance, "cap_0000-0003")
        assert not result.success
        message = failure_message(result)
        assert "1 of 3 tar(s) could not be scored" in message and "cap_0001" in message
        assert sorted(p.name for p in (root / "scores" / "cap").glob("*.parquet")) == [
            "00000000.parquet",
            "00000002.parquet",
        ]
        stats = Catalog(root / "unifilter.duckdb", root=root).query("SELECT partition_key FROM score_stats")[
            1
        ]
        assert sorted(stats) == [("cap_0000",), ("cap_0002",)]


def test_sensor_and_schedule_work_on_groups(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = tmp_path / "root"
    _tars(root, [0, 1, 4])
    resources = _resources(root, tiny_checkpoint)
    (tmp_path / "dagster_home").mkdir()
    (tmp_path / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(tmp_path / "dagster_home")) as instance:  # schedules need a ref
        first = sensor_tick(instance, resources)
        assert isinstance(first, dg.SensorResult)
        assert sorted(r.partition_key for r in first.run_requests) == ["cap_0000-0003", "cap_0004-0007"]
        assert sorted(instance.get_dynamic_partitions("tars")) == ["cap_0000-0003", "cap_0004-0007"]
        assert isinstance(sensor_tick(instance, resources), dg.SkipReason)

        _tars(root, [2])  # a tar joins an existing group: that group is scored again, no new partition
        second = sensor_tick(instance, resources)
        assert isinstance(second, dg.SensorResult)
        assert [r.partition_key for r in second.run_requests] == ["cap_0000-0003"]
        assert second.run_requests[0].run_key != first.run_requests[0].run_key
        assert not second.dynamic_partitions_requests

        assert materialize([scores], resources, instance, "cap_0004-0007").success
        stale = schedule_tick(instance, resources)  # group 0 has unscored tars; group 1 is current
        assert [r.partition_key for r in stale] == ["cap_0000-0003"]


def test_bad_executor_settings_fail_before_any_work(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = tmp_path / "root"
    _tars(root, [0])
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("tars", ["cap_0000-0003"])
        for scoring, pattern in (({"executor": "spark"}, "executor must be 'local' or 'ray'"),
                                 ({"executor": "ray"}, "set ray_address")):  # fmt: skip
            result = materialize(
                [scores], _resources(root, tiny_checkpoint, **scoring), instance, "cap_0000-0003"
            )
            assert not result.success and pattern in failure_message(result)
        assert not (root / "scores").exists()


def test_single_and_grouped_partitions_give_the_same_tables(tmp_path: Path, tiny_checkpoint: Path) -> None:
    tables = {}
    for group_size in (1, 4):
        root = tmp_path / f"root{group_size}"
        _tars(root, [0, 1])
        resources = _resources(root, tiny_checkpoint, group_size=group_size)
        with dg.DagsterInstance.ephemeral() as instance:
            assert materialize([tar_manifest], resources, instance).success
            keys = instance.get_dynamic_partitions("tars")
            assert keys == (["cap_0000", "cap_0001"] if group_size == 1 else ["cap_0000-0003"])
            for key in keys:
                assert materialize([scores], resources, instance, key).success
        tables[group_size] = {p.name: pq.read_table(p).select(["key", "partition_key", "score"]).to_pylist()
                              for p in sorted((root / "scores" / "cap").glob("*.parquet"))}  # fmt: skip
    assert sorted(tables[1]) == ["00000000.parquet", "00000001.parquet"]
    assert tables[1] == tables[4]
