"""Sensor and schedule ticks request the right partitions; GPU runs carry one GPU id each."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from tests.dagster.world import TEMPLATE_PARTITIONS, World
from unifilter_dagster.automation import new_tars_sensor, stale_scores_schedule
from unifilter_dagster.definitions import ALL_ASSETS
from unifilter_dagster.partitions import GPU_TAG, gpu_for_partition
from unifilter_dagster.resources import ScoringModelResource


def sensor_tick(instance: Any, resources: dict[str, Any]) -> dg.SensorResult | dg.SkipReason:
    # as a context manager: its resources (and their Dagster context variables) are released here, not whenever
    # the garbage collector gets to it (a late release once broke a later test's materialize)
    with dg.build_sensor_context(instance=instance, resources=resources) as context:
        result = new_tars_sensor(context)
    if isinstance(result, dg.SensorResult):
        # what the daemon does with the tick's partition requests
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def schedule_tick(
    instance: Any, resources: dict[str, Any], when: datetime | None = None
) -> list[dg.RunRequest] | dg.SkipReason:
    with dg.build_schedule_context(
        instance=instance, resources=resources, scheduled_execution_time=when
    ) as context:
        return stale_scores_schedule(context)


def test_sensor_registers_and_requests_only_new_tars(world: World) -> None:
    resources = world.resources()
    with dg.DagsterInstance.ephemeral() as instance:  # no partition registered yet
        first = sensor_tick(instance, resources)
        assert isinstance(first, dg.SensorResult)
        assert sorted(r.partition_key for r in first.run_requests) == TEMPLATE_PARTITIONS
        assert all(r.asset_selection == [dg.AssetKey("scores")] for r in first.run_requests)
        assert all(GPU_TAG not in r.tags for r in first.run_requests)  # CPU scoring: no GPU tag
        assert sorted(instance.get_dynamic_partitions("tars")) == TEMPLATE_PARTITIONS

        assert isinstance(sensor_tick(instance, resources), dg.SkipReason)

        world.add_tar_42()
        third = sensor_tick(instance, resources)
        assert isinstance(third, dg.SensorResult)
        assert [r.partition_key for r in third.run_requests] == ["obelics_0042"]
        assert "obelics_0042" in instance.get_dynamic_partitions("tars")
    registered = world.catalog().query("SELECT partition_key FROM tars WHERE partition_key = 'obelics_0042'")
    assert registered[1] == [("obelics_0042",)]


def _changed_classifier(world: World, dest: Path) -> Path:
    """A copy of the active classifier with a different config (so a different model fingerprint)."""
    active = Path(json.loads((world.root / "models" / "active_classifier.json").read_text())["path"])
    shutil.copytree(active, dest, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((dest / "config.json").read_text())
    config["unifilter_test_marker"] = 1
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_schedule_requests_missing_then_stale_partitions(world: World, instance: Any, tmp_path: Path) -> None:
    resources = world.resources()
    result = dg.materialize(
        ALL_ASSETS,
        selection=["scores"],
        resources=resources,
        instance=instance,
        partition_key="datacomp_0000",
    )
    assert result.success

    missing = schedule_tick(instance, resources)
    assert isinstance(missing, list)
    assert sorted(r.partition_key for r in missing) == ["datacomp_0001", "obelics_0000"]

    other = ScoringModelResource(checkpoint=str(_changed_classifier(world, tmp_path / "other")))
    when = datetime(2026, 1, 2, 3, 0, tzinfo=timezone.utc)
    stale = schedule_tick(instance, {**resources, "scoring_model": other}, when)
    assert isinstance(stale, list)
    assert sorted(r.partition_key for r in stale) == TEMPLATE_PARTITIONS
    assert {r.run_key for r in stale} == {f"stale-20260102T0300:{k}" for k in TEMPLATE_PARTITIONS}


def test_schedule_skips_when_everything_is_current(world: World, instance: Any) -> None:
    resources = world.resources()
    for key in TEMPLATE_PARTITIONS:
        dg.materialize(
            ALL_ASSETS, selection=["scores"], resources=resources, instance=instance, partition_key=key
        )
    assert isinstance(schedule_tick(instance, resources), dg.SkipReason)


def test_gpu_tags_one_gpu_id_per_run(world: World) -> None:
    resources = world.resources(scoring_model=ScoringModelResource(num_gpus=2))
    with dg.DagsterInstance.ephemeral() as instance:
        result = sensor_tick(instance, resources)
    assert isinstance(result, dg.SensorResult)
    tags = {r.partition_key: r.tags[GPU_TAG] for r in result.run_requests}
    assert set(tags) == set(TEMPLATE_PARTITIONS)
    assert set(tags.values()) <= {"0", "1"}
    assert all(tags[k] == str(gpu_for_partition(k, 2)) for k in tags)
    # each tagged run scores on its own GPU; without CUDA the resource falls back to the CPU
    import torch

    model = ScoringModelResource(num_gpus=2)
    assert model.settings("caption", "1").device in ("cpu", "cuda:1")
    if torch.cuda.device_count() >= 2:
        assert ScoringModelResource(device="cuda:1").settings("caption", "0").device == "cuda:1"
    else:  # an explicit GPU this machine lacks is an error, not a silent CPU run
        from unifilter_core.scoring.settings import SettingsError

        with pytest.raises(SettingsError, match="cuda:1"):
            ScoringModelResource(device="cuda:1").settings("caption", "0")


def test_sensor_ticks_are_bounded_and_the_rest_come_next(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    import unifilter_dagster.automation as automation

    monkeypatch.setattr(automation, "MAX_NEW_PARTITIONS_PER_TICK", 2)
    resources = world.resources()
    seen: list[str] = []
    with dg.DagsterInstance.ephemeral() as instance:
        while isinstance(result := sensor_tick(instance, resources), dg.SensorResult):
            keys = [r.partition_key for r in result.run_requests]
            assert 1 <= len(keys) <= 2 and not set(keys) & set(seen)
            seen += keys
        assert sorted(seen) == TEMPLATE_PARTITIONS == sorted(instance.get_dynamic_partitions("tars"))


def test_registering_more_partitions_than_sqlite_takes_in_one_statement(tmp_path: Path) -> None:
    """300k keys in one call fail in Dagster's SQLite storage ("too many SQL variables"); in chunks they go in."""
    from unifilter_dagster.assets.tars import register_new_partitions

    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    keys = [f"datacomp_{i:07d}" for i in range(300_000)]
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert register_new_partitions(instance, keys[:5]) == keys[:5]
        assert len(register_new_partitions(instance, keys)) == 300_000 - 5
        assert len(instance.get_dynamic_partitions("tars")) == 300_000
        assert register_new_partitions(instance, keys) == []
