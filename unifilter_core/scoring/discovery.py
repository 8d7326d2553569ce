"""Finding the tars to score and the ``--gpu-id`` / ``--tars-per-gpu`` block of them.

The original scripts assumed a fixed id range (``range(100000)``) and probed for each file; here the tars are
discovered: every ``*.tar`` directly inside a folder whose stem is a number (``00000042.tar``), sorted by that
number. ``--gpu-id I --tars-per-gpu N`` then selects positions ``[I*N, (I+1)*N)`` of the sorted list, which is the
original block rule applied to the tars that exist.
"""

from __future__ import annotations

import os
from pathlib import Path


def _numeric_stem(path: Path) -> int | None:
    stem = path.name[: -len(".tar")] if path.name.endswith(".tar") else None
    return int(stem) if stem is not None and stem.isdigit() else None


def discover_tars(path: str | os.PathLike[str]) -> list[Path]:
    """The tars to score under ``path`` (a folder, not recursive) or ``path`` itself (a single ``.tar`` file).

    Args:
        path: a folder holding ``<NNNNNNNN>.tar`` shards, or one such file.

    Returns:
        Absolute paths sorted by their numeric stem (ties by name, e.g. ``0042.tar`` before ``00000042.tar``).

    Raises:
        ValueError: the path does not exist, is a file that is not a ``<number>.tar``, or is a folder with no
            such tar (names of other files found are mentioned to help).
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"tar path {str(root)!r} does not exist")
    root = root.resolve()
    if root.is_file():
        if _numeric_stem(root) is None:
            raise ValueError(f"{str(root)!r} is not a shard named <number>.tar (e.g. 00000042.tar)")
        return [root]
    if not root.is_dir():
        raise ValueError(f"tar path {str(root)!r} is neither a folder nor a file")
    found = [(n, p.name, p) for p in root.iterdir() if p.is_file() and (n := _numeric_stem(p)) is not None]
    if not found:
        others = sorted(p.name for p in root.iterdir() if p.name.endswith(".tar"))[:3]
        hint = f" (found {', '.join(others)}: names must be <number>.tar)" if others else ""
        raise ValueError(f"no <number>.tar shards in folder {str(root)!r}{hint}")
    return [p for _, _, p in sorted(found)]


def select_block(tars: list[Path], gpu_id: int, tars_per_gpu: int | None) -> list[Path]:
    """Positions ``[gpu_id * tars_per_gpu, (gpu_id + 1) * tars_per_gpu)`` of the sorted tar list.

    Args:
        tars: the output of :func:`discover_tars`.
        gpu_id: block index (>= 0).
        tars_per_gpu: block size (>= 1); None means one block holding every tar (then ``gpu_id`` must be 0).

    Returns:
        The block; empty when ``gpu_id`` points past the end (a launcher may start more GPUs than there are
        blocks: those have nothing to do).

    Raises:
        ValueError: negative ``gpu_id``, ``tars_per_gpu`` < 1, or ``gpu_id`` > 0 without ``tars_per_gpu``.
    """
    if gpu_id < 0:
        raise ValueError(f"--gpu-id must be >= 0, got {gpu_id}")
    if tars_per_gpu is None:
        if gpu_id != 0:
            raise ValueError("--gpu-id > 0 needs --tars-per-gpu (the block size)")
        return list(tars)
    if tars_per_gpu < 1:
        raise ValueError(f"--tars-per-gpu must be >= 1, got {tars_per_gpu}")
    return list(tars[gpu_id * tars_per_gpu : (gpu_id + 1) * tars_per_gpu])
