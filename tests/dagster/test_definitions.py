"""The definitions load and validate; the instance and workspace files are consistent with the CLI."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.dagster.world import BIN, REPO_ROOT, new_dagster_home

DESIGN_ASSETS = {
    "synthetic_caption_pairs",
    "synthetic_interleaved_pairs",
    "llava_pretrain_subset",
    "stage1_projector",
    "stage2_classifier",
    "tar_manifest",
    "scores",
    "quality_threshold",
    "filtered_dataset",
}
PARTITIONED = {"scores", "filtered_dataset"}


def test_definitions_validate_with_every_design_asset() -> None:
    from unifilter_dagster import defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == DESIGN_ASSETS
    for key in DESIGN_ASSETS:
        partitions = graph.get(dg.AssetKey(key)).partitions_def
        if key in PARTITIONED:
            assert isinstance(partitions, dg.DynamicPartitionsDefinition), key
            assert partitions.name == "tars"
        else:
            assert partitions is None, key
    assert defs.resolve_job_def("score_tars").partitions_def.name == "tars"
    assert defs.resolve_sensor_def("new_tars_sensor") is not None
    assert defs.resolve_schedule_def("stale_scores_schedule") is not None
    checks = {k.name for k in graph.asset_check_keys}
    assert {"one_row_per_sample", "scores_finite_in_range", "validation_accuracy_floor"} <= checks


def test_dg_check_defs_exits_zero() -> None:
    proc = subprocess.run(
        [str(BIN / "dg"), "check", "defs"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loaded successfully" in proc.stdout + proc.stderr


def test_workspace_location_name_is_the_module_name() -> None:
    workspace = yaml.safe_load((REPO_ROOT / "workspace.yaml").read_text())
    (entry,) = workspace["load_from"]
    module = entry["python_module"]
    assert module["module_name"] == "unifilter_dagster"
    assert module["location_name"] == module["module_name"]
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'code_location_name = "unifilter_dagster"' in pyproject


def test_dagster_yaml_loads_as_instance_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dagster._core.run_coordinator import QueuedRunCoordinator

    home = new_dagster_home(tmp_path / "home")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        assert instance.root_directory == str(home)
        assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config
        assert queue.max_concurrent_runs == 8
        limits = queue.tag_concurrency_limits
        gpu = [lim for lim in limits if lim["key"] == "unifilter/gpu"]
        assert {"key": "unifilter/gpu", "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in gpu
        assert any(lim["key"] == "unifilter/training" and lim["limit"] == 1 for lim in limits)
        # ... and the training job carries that tag, so the limit applies to its runs
        from unifilter_dagster.automation import train_classifier_job
        from unifilter_dagster.partitions import TRAINING_TAG

        assert TRAINING_TAG == "unifilter/training" and train_classifier_job.tags == {TRAINING_TAG: "true"}
        assert instance.telemetry_enabled is False


def test_claude_resource_builds_the_core_config() -> None:
    from unifilter_core.synth.claude import ClaudeConfig
    from unifilter_dagster.resources import ClaudeResource

    default = ClaudeResource().claude_config()
    assert default.max_retries == ClaudeConfig().max_retries and default.model == ClaudeConfig().model
    model = "claude-haiku-4-5"
    config = ClaudeResource(max_retries=2, model=model, budget_usd=1.5, mode="batches").claude_config()
    assert (config.max_retries, config.model, config.budget_usd, config.mode) == (2, model, 1.5, "batches")
