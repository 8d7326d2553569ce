"""A resumed ``scores`` partition loads no model and reads no byte of its tar; any change goes the full way."""

from __future__ import annotations

import builtins
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.conftest import failure_message, make_resources, materialize
from tests.tarfixtures import write_caption_tar


class _Spy:
    """Counts scorer loads and fails any open() of the tar while armed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tar: Path) -> None:
        import unifilter_core.scorer as scorer_module

        self.loads = 0
        self.tar_opened = 0
        self.armed = False
        real_load, real_open = scorer_module.load_scorer, builtins.open

        def load(*args: Any, **kwargs: Any) -> Any:
            self.loads += 1
            return real_load(*args, **kwargs)

        def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if self.armed and isinstance(file, (str, os.PathLike)) and Path(file).name == tar.name:
                self.tar_opened += 1
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(scorer_module, "load_scorer", load)
        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / "scores/cap/00000000.manifest.json").read_text())


def test_resumed_partition_loads_no_model_and_reads_no_tar(
    tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg

    from unifilter_dagster.assets.tars import scores, tar_manifest

    root = tmp_path / "root"
    tar = write_caption_tar(root / "sources/cap/00000000.tar", n=6)
    spy = _Spy(monkeypatch, tar)
    resources = make_resources(root, tiny_checkpoint, [("cap", "caption")])
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        first = materialize([scores], resources, instance, "cap_0000")
        assert first.success and spy.loads == 1
        key = _manifest(root)["request_key"]

        spy.armed = True
        again = materialize([scores], resources, instance, "cap_0000")
        assert again.success
        assert spy.loads == 1 and spy.tar_opened == 0  # neither the model nor the tar
        meta = again.asset_materializations_for_node("scores")[0].metadata
        assert meta["resumed"].value is True and meta["rows"].value == 6
        checks = {c.check_name: c.passed for c in again.get_asset_check_evaluations()}
        assert checks == {
            "one_row_per_sample": True,
            "scores_finite_in_range": True,
            "score_drift": True,
            "scorer_canary": True,
        }

        # a touched tar (same bytes): the full check runs, resumes after hashing, records the new key
        os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
        spy.armed = False
        touched = materialize([scores], resources, instance, "cap_0000")
        assert touched.success and spy.loads == 2
        assert touched.asset_materializations_for_node("scores")[0].metadata["resumed"].value is True
        assert _manifest(root)["request_key"] != key
        spy.armed = True
        assert materialize([scores], resources, instance, "cap_0000").success
        assert spy.loads == 2 and spy.tar_opened == 0  # the new key resumes without the model again

        # another setting that can change scores: no shortcut, the tar is rescored
        spy.armed = False
        stretched = make_resources(root, tiny_checkpoint, [("cap", "caption")], image_aspect_ratio="resize")
        rescored = materialize([scores], stretched, instance, "cap_0000")
        assert rescored.success and spy.loads == 3
        assert rescored.asset_materializations_for_node("scores")[0].metadata["resumed"].value is False
        assert _manifest(root)["config"]["processing"]["image_aspect_ratio"] == "resize"


def test_request_key_follows_every_input(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import shutil

    from unifilter_core.scoring import ScoringConfig
    from unifilter_core.scoring.resume import request_key

    tar = write_caption_tar(tmp_path / "00000000.tar", n=2)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    settings = {"device": "cpu", "dtype": "float32"}

    def key(**over: Any) -> str:
        args: dict[str, Any] = {"tar": tar, "checkpoint": ckpt, "kind": "caption", "settings": settings,
                                "config": ScoringConfig(num_workers=0), **over}  # fmt: skip
        return request_key(**args)

    base = key()
    assert key() == base
    assert key(config=ScoringConfig(num_workers=3, batch_size=64)) == base  # speed options do not count
    assert key(kind="interleaved") != base
    assert key(settings={**settings, "dtype": "bfloat16"}) != base
    assert key(output_format="original") != base
    link = tmp_path / "00000007.tar"
    link.symlink_to(tar)
    assert key(tar=link) != base  # a symlinked shard is its own partition
    weights = ckpt / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert key() != base  # a checkpoint file changed (by its mtime)


def test_missing_inputs_are_typed_in_core_and_worded_by_the_assets(
    tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """Core names what is missing (``MissingInput.needs``) and no asset; the asset says what to materialize."""
    import dagster as dg

    from unifilter_core.partition_steps import MissingInput, TarSource, filter_partition, read_thresholds
    from unifilter_dagster.assets.tars import filtered_dataset, quality_threshold, tar_manifest

    root = tmp_path / "root"
    tar = write_caption_tar(root / "sources/cap/00000000.tar", n=2)
    with pytest.raises(MissingInput) as info:
        read_thresholds(root)
    assert info.value.needs == "thresholds" and "materialize" not in str(info.value)
    (root / "thresholds.json").write_text('{"cap": {"threshold": 0.5}}')
    with pytest.raises(MissingInput) as info:
        filter_partition(root, TarSource("cap", "caption"), tar, "cap_0000")
    assert info.value.needs == "scores" and "materialize" not in str(info.value)
    (root / "thresholds.json").unlink()

    resources = make_resources(root, tiny_checkpoint, [("cap", "caption")])
    with dg.DagsterInstance.ephemeral() as instance:
        assert materialize([tar_manifest], resources, instance).success
        result = materialize([quality_threshold], resources, instance)
        assert not result.success
        assert "no scored samples yet: materialize `scores`" in failure_message(result)
        result = materialize([filtered_dataset], resources, instance, "cap_0000")
        assert not result.success and "materialize `quality_threshold` first" in failure_message(result)
