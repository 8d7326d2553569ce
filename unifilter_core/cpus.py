"""How many CPU cores this process may use, and how many of them are idle right now."""

from __future__ import annotations

import os
import time
from pathlib import Path

AUTO = "auto"


def available_cpus() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over ``cpus`` from ``/proc/stat``; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    idle = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]
        idle += values[3] + values[4]  # idle + iowait
        total += sum(values)
    return idle, total


def idle_cpus(window: float = 0.5) -> int:
    """Cores of this process's set that were idle over the next ``window`` seconds, rounded (at least 1).

    A quiet 2-core machine gives 2; the same machine with one busy process beside this one gives 1. Where
    ``/proc/stat`` cannot be read the answer is :func:`available_cpus`.
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return available_cpus()
    before = _cpu_times(cpus)
    if before is None:
        return len(cpus)
    time.sleep(window)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return len(cpus)
    share = (after[0] - before[0]) / (after[1] - before[1])
    return max(1, min(len(cpus), int(share * len(cpus) + 0.3)))


def resolve_threads(value: int | str | None) -> int | None:
    """A ``torch_threads`` setting as a thread count: ``"auto"`` -> :func:`idle_cpus`; None stays None."""
    if value == AUTO:
        return idle_cpus()
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"torch_threads must be an int >= 1, 'auto' or None, got {value!r}")
    return value
