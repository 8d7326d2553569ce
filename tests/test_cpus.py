"""Thread counts for training: ``torch_threads: auto`` takes the cores that are idle when training starts."""

from __future__ import annotations

import os

import pytest

import unifilter_core.cpus as cpus
from unifilter_core.training.config import Stage2Config
from unifilter_core.training.vision import VisionPretrainConfig


def _fake_times(monkeypatch: pytest.MonkeyPatch, n_cpus: int, idle_share: float) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n_cpus)))
    samples = iter([(0.0, 0.0), (idle_share * 100 * n_cpus, 100.0 * n_cpus)])
    monkeypatch.setattr(cpus, "_cpu_times", lambda which: next(samples))


@pytest.mark.parametrize(
    "n_cpus, idle_share, want",
    [(2, 0.98, 2), (2, 0.5, 1), (2, 0.0, 1), (8, 0.75, 6), (8, 0.68, 5), (1, 1.0, 1)],
)
def test_idle_cpus_counts_the_idle_cores(monkeypatch, n_cpus: int, idle_share: float, want: int) -> None:
    _fake_times(monkeypatch, n_cpus, idle_share)
    assert cpus.idle_cpus(window=0) == want


def test_idle_cpus_reads_proc_stat() -> None:
    got = cpus.idle_cpus(window=0.05)
    assert 1 <= got <= cpus.available_cpus()
    if os.path.exists("/proc/stat"):
        idle, total = cpus._cpu_times(set(os.sched_getaffinity(0)))
        assert 0 < idle < total


def test_resolve_threads_and_config_checks(monkeypatch) -> None:
    _fake_times(monkeypatch, 4, 0.5)
    assert cpus.resolve_threads("auto") == 2
    assert cpus.resolve_threads(3) == 3 and cpus.resolve_threads(None) is None
    for bad in (0, -1, "two", True, 1.5):
        with pytest.raises(ValueError, match="torch_threads"):
            cpus.resolve_threads(bad)
        with pytest.raises(ValueError, match="torch_threads"):
            Stage2Config(model_path="m", output_dir="o", data_path="d", torch_threads=bad).validate()
        with pytest.raises(ValueError, match="torch_threads"):
            VisionPretrainConfig(torch_threads=bad)
    Stage2Config(model_path="m", output_dir="o", data_path="d", torch_threads="auto").validate()
    assert VisionPretrainConfig(torch_threads="auto").torch_threads == "auto"
