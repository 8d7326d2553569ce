"""Stage 2 through the DeepSpeed path: 2 CPU processes (gloo) under torchrun, ZeRO-3, a few steps.

The first DeepSpeed run on a machine builds a small op (about a minute); later runs take about 20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

from tests.test_training import WORDS  # noqa: E402 (after the deepspeed skip)

pytestmark = pytest.mark.slow  # DeepSpeed's two-process runs (and its op build on first use)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(root: Path) -> None:
    from PIL import Image

    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        pixels[..., i % 3] = 40 + 25 * i
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
    pairs = [
        {
            "image": f"{i}.png",
            "text": "<image>\n" + " ".join(rng.choice(WORDS, size=3 + level)),
            "label": level,
        }
        for i in range(8)
        for level in range(4)
    ]
    (root / "train.json").write_text(json.dumps(pairs))
    (root / "val.json").write_text(json.dumps(pairs[:16]))


def _launch_two_ranks(tmp_path: Path, stage: str, config: dict) -> None:
    """``torchrun --nproc_per_node 2 -m unifilter_core.cli.train STAGE`` on CPU (gloo); fails the test on error."""
    if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
        pytest.skip("torchrun is not installed")
    (tmp_path / f"{stage}.json").write_text(json.dumps({stage: config}))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "unifilter_core.cli.train", stage, "--config", str(tmp_path / f"{stage}.json")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_deepspeed_zero3_two_processes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from unifilter_core.scorer import load_scorer

    _write_data(tmp_path)
    out = tmp_path / "out"
    stage2 = {
        "model_path": str(tiny_checkpoint), "output_dir": str(out), "data_path": str(tmp_path / "train.json"),
        "eval_data_path": str(tmp_path / "val.json"), "deepspeed": "zero3", "per_device_train_batch_size": 4,
        "max_steps": 6, "learning_rate": 1e-2, "warmup_ratio": 0.0, "logging_steps": 1,
        "freeze_vision_tower": False, "torch_threads": 1,
    }  # fmt: skip
    _launch_two_ranks(tmp_path, "stage2", stage2)

    metrics = json.loads((out / "metrics.json").read_text())
    losses = [point["loss"] for point in metrics["training_curve"]]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < losses[0]  # MSE from the untrained head's ~3.5 falls within a few steps
    assert (out / "checkpoints" / "checkpoint-6" / "global_step6").is_dir()  # DeepSpeed's own checkpoint
    assert not (out / "training_args.bin").exists()

    scorer = load_scorer(out)
    from PIL import Image

    [result] = scorer.score_captions([(Image.open(tmp_path / "images" / "0.png"), "a red cube")])
    assert result.status == "ok" and np.isfinite(result.score)


def test_deepspeed_zero2_stage1_two_processes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Stage 1 (projector pre-training) through ZeRO-2 on 2 ranks: loss falls, the projector keeps its released
    key names and loads into the classifier, and only the projector changed (tower and LLM frozen)."""
    from safetensors.torch import load_file

    from unifilter_core.modeling import UniFilterForQualityScoring
    from unifilter_core.training import load_projector

    _write_data(tmp_path)
    pretrain = [
        {"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": " ".join(WORDS[i : i + 6])}]}
        for i in range(8)
    ]  # fmt: skip
    (tmp_path / "pretrain.json").write_text(json.dumps(pretrain * 4))
    out = tmp_path / "s1"
    stage1 = {
        "model_path": str(tiny_checkpoint), "output_dir": str(out), "data_path": str(tmp_path / "pretrain.json"),
        "deepspeed": "zero2", "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 1e-2,
        "warmup_ratio": 0.0, "logging_steps": 1, "torch_threads": 1,
    }  # fmt: skip
    _launch_two_ranks(tmp_path, "stage1", stage1)

    metrics = json.loads((out / "stage1_metrics.json").read_text())
    assert metrics["global_steps"] == 6 and not metrics["full_checkpoint"]  # tower and LLM frozen (released)
    state = load_file(str(out / "mm_projector.safetensors"))
    assert set(state) == {
        f"model.mm_projector.mlp_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")
    }
    model = UniFilterForQualityScoring.from_pretrained(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.model.mm_projector.state_dict().items()}
    load_projector(model, out / "mm_projector.safetensors")
    after = model.model.mm_projector.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the projector trained
    curve = [
        p["loss"] for p in json.loads((out / "stage1_metrics.json").read_text()).get("training_curve", [])
    ]
    if curve:
        assert np.mean(curve[-2:]) < curve[0]
