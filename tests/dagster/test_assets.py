"""Each asset materialized in-process on the tiny world (real instance on a temp DAGSTER_HOME)."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster._serdes import serialize_value
from PIL import Image

from tests.dagster.world import TEMPLATE_PARTITIONS, World
from tests.fake_anthropic import FakeAnthropic
from unifilter_dagster.definitions import ALL_ASSETS

PNG_URI = "data:image/png;base64,"


def materialize(world: World, instance: Any, selection: list[str], **kw: Any) -> dg.ExecuteInProcessResult:
    resources = world.resources(**kw.pop("resources", {}))
    result = dg.materialize(ALL_ASSETS, selection=selection, resources=resources, instance=instance, **kw)
    assert result.success
    return result


def metadata_of(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(asset)
    return {k: v.value for k, v in mat.metadata.items()}


def has_png(value: Any) -> bool:
    return isinstance(value, str) and PNG_URI in value and len(value) > len(PNG_URI) + 200


def rows(world: World, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    return world.catalog().query(sql, params)[1]


# ------------------------------------------------------------------------------------------ models (template)


def test_training_assets_ran_and_report_plots(template: World) -> None:
    """stage1/stage2 trained through the assets (2 steps each) in the session template."""
    classifier = template.root / "models" / "stage2_classifier"
    metrics = json.loads((classifier / "metrics.json").read_text())
    assert metrics["global_steps"] == 2 and metrics["best"]["confusion_matrix"]
    assert (template.root / "models" / "stage1_projector" / "stage1_metrics.json").is_file()
    active = json.loads((template.root / "models" / "active_classifier.json").read_text())
    assert Path(active["path"]) == classifier
    with template.instance() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("stage2_classifier"))
        meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
        assert meta["model_fingerprint"] == active["fingerprint"]
        for key in ("training_curve", "confusion_matrix"):
            assert has_png(meta[key]), key
        assert "level 3" in meta["per_level_accuracy"] and "accuracy" in meta["per_level_accuracy"]
        checks = [
            e.dagster_event.event_specific_data
            for e in instance.all_logs(template.run_id)
            if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ]
        (accuracy_check,) = [c for c in checks if c.check_name == "validation_accuracy_floor"]
        assert accuracy_check.passed  # floor 0.0 in the template
        stage1 = instance.get_latest_materialization_event(dg.AssetKey("stage1_projector"))
        stage1_meta = {k: v.value for k, v in stage1.asset_materialization.metadata.items()}
        # the world tower was pre-trained on world scenes before stage 1 (training/vision.py)
        assert stage1_meta["tower_colour_accuracy"] > 0.9, stage1_meta
        assert (template.root / "models" / "init" / "vision_pretrain.json").is_file()
    lineage = rows(template, "SELECT asset_key, model_fingerprint FROM lineage ORDER BY asset_key")
    assert ("stage2_classifier", active["fingerprint"]) in lineage
    assert {"stage1_projector", "tar_manifest", "llava_pretrain_subset"} <= {a for a, _ in lineage}


def test_classifier_check_fails_below_the_floor(world: World, instance: Any) -> None:
    """Adopting a checkpoint evaluates it; an unreachable floor fails the asset check (not the run)."""
    classifier = json.loads((world.root / "models" / "active_classifier.json").read_text())["path"]
    config = {"use_checkpoint": classifier, "min_accuracy": 1.01}
    result = materialize(
        world, instance, ["stage2_classifier"], run_config={"ops": {"stage2_classifier": {"config": config}}}
    )
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == "validation_accuracy_floor" and not check.passed
    meta = metadata_of(result, "stage2_classifier")
    assert has_png(meta["confusion_matrix"]) and has_png(meta["training_curve"])


# ------------------------------------------------------------------------------------------ tars


def test_tar_manifest_registers_partitions_idempotently(world: World, instance: Any) -> None:
    world.add_tar_42()
    first = metadata_of(materialize(world, instance, ["tar_manifest"]), "tar_manifest")
    second = metadata_of(materialize(world, instance, ["tar_manifest"]), "tar_manifest")
    expected = sorted([*TEMPLATE_PARTITIONS, "obelics_0042"])
    assert first["new_partitions"] == 1 and second["new_partitions"] == 0
    assert sorted(instance.get_dynamic_partitions("tars")) == expected
    registered = rows(world, "SELECT partition_key, count(*) FROM tars GROUP BY 1 ORDER BY 1")
    assert registered == [(k, 1) for k in expected]
    (path,) = rows(world, "SELECT path FROM tars WHERE partition_key = 'obelics_0042'")[0]
    assert path == str(world.root / "sources" / "obelics" / "00000042.tar")


def test_scores_partition_table_catalog_checks_and_rerun(world: World, instance: Any) -> None:
    from unifilter_core.data import iter_raw_samples

    key = "datacomp_0000"
    result = materialize(world, instance, ["scores"], partition_key=key)
    table = world.root / "scores" / "datacomp" / "00000000.parquet"
    cols = pq.read_table(table).to_pydict()
    samples = [s.key for s in iter_raw_samples(world.root / "sources" / "datacomp" / "00000000.tar")]
    assert sorted(cols["key"]) == sorted(samples)  # one row per sample, broken ones included
    assert {"skipped", "error"} & set(cols["status"]) and "ok" in cols["status"]
    assert set(cols["partition_key"]) == {key}
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {
        "one_row_per_sample": True,
        "scores_finite_in_range": True,
        "score_drift": True,
        "scorer_canary": True,
    }
    canary = json.loads((world.root / "scores" / "datacomp" / "00000000.manifest.json").read_text())["canary"]
    assert (
        canary["passed"] and canary["n"] >= 4 and canary["max_abs_diff"] < 1e-4
    )  # the stage-2 reference's pairs
    (drift,) = rows(world, "SELECT reference, flagged FROM score_drift WHERE partition_key = ?", [key])
    assert drift == ("validation:caption", False)
    meta = metadata_of(result, "scores")
    assert has_png(meta["score_histogram"])
    assert "| ok |" in meta["status_counts"] and "reason" in meta["reason_counts"]
    assert meta["rows"] == len(samples)

    def catalog_state() -> tuple[Any, ...]:
        stats = rows(world, "SELECT n_rows, n_ok FROM score_stats WHERE partition_key = ?", [key])
        latest = rows(
            world, "SELECT run_id FROM lineage WHERE asset_key = 'scores' AND partition_key = ?", [key]
        )
        history = rows(world, "SELECT run_id FROM lineage_history WHERE asset_key = 'scores'")
        return stats, latest, history

    stats, latest, history = catalog_state()
    assert stats == [(len(samples), cols["status"].count("ok"))]
    assert latest == [(result.run_id,)] and history == [(result.run_id,)]

    again = materialize(world, instance, ["scores"], partition_key=key)
    stats2, latest2, history2 = catalog_state()
    assert stats2 == stats  # replaced, not duplicated
    assert latest2 == [(again.run_id,)]
    assert sorted(history2) == sorted([(result.run_id,), (again.run_id,)])


def test_threshold_and_filtered_dataset(world: World, instance: Any) -> None:
    import webdataset as wds

    for key in ("datacomp_0000", "obelics_0000"):
        materialize(world, instance, ["scores"], partition_key=key)
    config = {"ops": {"quality_threshold": {"config": {"keep_fraction": 0.5}}}}
    meta = metadata_of(
        materialize(world, instance, ["quality_threshold"], run_config=config), "quality_threshold"
    )
    assert has_png(meta["score_cdf"]) and "datacomp" in meta["thresholds"]
    recorded = dict(rows(world, "SELECT source, threshold FROM thresholds ORDER BY source"))
    assert set(recorded) == {"datacomp", "obelics"}

    result = materialize(world, instance, ["filtered_dataset"], partition_key="datacomp_0000")
    out = world.root / "filtered" / "datacomp" / "00000000.tar"
    table = pq.read_table(world.root / "scores" / "datacomp" / "00000000.parquet").to_pydict()
    score = {
        k: (s, st, u)
        for k, s, st, u in zip(table["key"], table["score"], table["status"], table["uid"], strict=True)
    }
    expected = {k for k, (s, st, _) in score.items() if st == "ok" and s >= recorded["datacomp"]}
    assert expected and len(expected) < len(score)

    listed = subprocess.run(["tar", "-tf", str(out)], capture_output=True, text=True, check=True).stdout
    tar_keys = {name.split("/")[-1].split(".")[0] for name in listed.split()}
    assert tar_keys == expected
    keys = {sample["__key__"] for sample in wds.WebDataset(str(out), shardshuffle=False)}
    assert keys == expected
    assert all(score[k][0] >= recorded["datacomp"] for k in keys)

    subset = np.load(out.with_name("00000000.uids.npy"), allow_pickle=False)
    assert subset.dtype == np.dtype("u8,u8") and len(subset) == len(expected)
    uids = {score[k][2] for k in expected}
    assert {f"{a:016x}{b:016x}" for a, b in subset.tolist()} == uids
    assert metadata_of(result, "filtered_dataset")["kept"] == len(expected)
    manifest = json.loads(out.with_name("00000000.manifest.json").read_text())
    assert manifest["kept"] == len(expected)


# ------------------------------------------------------------------------------------------ training data


def _llava_download(folder: Path) -> Path:
    """A LLaVA-Pretrain-format download: JSON + images/, with 4 valid and 5 invalid records."""
    images = folder / "images"
    records: list[Any] = []
    for i in range(4):
        rel = f"00000/{i:09d}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 16), (40 * i, 90, 200)).save(images / rel)
        human = {"from": "human", "value": "<image>\nWrite a brief caption."}
        records.append(
            {"id": f"{i:09d}", "image": rel, "conversations": [human, {"from": "gpt", "value": f"cube {i}"}]}
        )
    good = records[0]
    records += [
        {**good, "id": "no-file", "image": "00000/missing.jpg"},
        {
            **good,
            "id": "no-token",
            "conversations": [{"from": "human", "value": "caption"}, good["conversations"][1]],
        },
        {**good, "id": "empty", "conversations": [good["conversations"][0], {"from": "gpt", "value": " "}]},
        {**good, "id": "escape", "image": "../outside.jpg"},
        ["not", "a", "record"],
    ]
    (folder / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))
    return folder


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_llava_pretrain_subset_from_a_real_format_download(
    world: World, instance: Any, tmp_path: Path, as_zip: bool
) -> None:
    download = _llava_download(tmp_path / "download")
    images: Path = download / "images"
    if as_zip:
        images = download / "images.zip"
        with zipfile.ZipFile(images, "w") as zf:
            for file in sorted((download / "images").rglob("*.jpg")):
                zf.write(file, f"images/{file.relative_to(download / 'images')}")
    config = {
        "json_path": str(download / "blip_laion_cc_sbu_558k.json"),
        "images": str(images),
        "subset_size": 3,
    }
    result = materialize(
        world,
        instance,
        ["llava_pretrain_subset"],
        run_config={"ops": {"llava_pretrain_subset": {"config": config}}},
    )
    out = world.root / "pretrain" / "llava_pretrain"
    kept = json.loads((out / "blip_laion_cc_sbu_558k.json").read_text())
    assert len(kept) == 3 and all((out / "images" / r["image"]).is_file() for r in kept)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejected}
    assert reasons == {
        "no-file": "missing_image",
        "no-token": "missing_image",
        "empty": "missing_text",
        "escape": "unsafe_member_name",
        None: "invalid_fields",
    }
    meta = metadata_of(result, "llava_pretrain_subset")
    assert meta["records"] == 3 and meta["valid"] == 4 and meta["records_read"] == 9


def test_synthetic_pairs_from_claude_never_leak_the_key(
    world: World, instance: Any, tmp_path: Path, fake: FakeAnthropic
) -> None:
    from unifilter_dagster.resources import ClaudeResource

    folder = tmp_path / "source_images"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (24, 16), (30 * i, 120, 60)).save(folder / f"img{i}.png")
    claude = ClaudeResource(backend="claude", source_type="images", source_path=str(folder), mode="messages")
    # the template's world pairs are in synthetic/<kind>: the Claude run moves them to synthetic/<kind>.world
    world_caption = sorted(p.name for p in (world.root / "synthetic" / "caption").iterdir())
    result = materialize(
        world,
        instance,
        ["synthetic_caption_pairs", "synthetic_interleaved_pairs"],
        resources={"claude": claude},
    )
    caption = metadata_of(result, "synthetic_caption_pairs")
    assert caption["backend"] == "claude" and caption["records"] == 6 * 4
    aside = world.root / "synthetic" / "caption.world"
    assert caption["world_pairs_moved_to"] == str(aside)
    assert sorted(p.name for p in aside.iterdir()) == world_caption  # kept, not deleted
    assert (world.root / "synthetic" / "caption" / "ledger.jsonl").is_file()
    assert metadata_of(result, "synthetic_interleaved_pairs")["records"] > 0
    assert len(fake.received("POST", "/v1/messages")) == 6 + 2
    ledger = rows(world, "SELECT kind, count(*) FROM generation_ledger GROUP BY kind ORDER BY kind")
    assert [k for k, _ in ledger] == ["caption", "interleaved"]

    key = fake.api_key
    logs = instance.all_logs(result.run_id)
    assert len(logs) > 10
    assert not any(key in serialize_value(e) for e in logs)
    for base in (world.root, world.home):
        for file in base.rglob("*"):
            if file.is_file():
                assert key.encode() not in file.read_bytes(), file
