"""Reading and writing weights as safetensors only: pickle files are refused, never loaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
# Not weights: a pickle of training arguments that the released checkpoint carries; it is ignored.
_IGNORED = {"training_args.bin"}


def _pickle_files(directory: Path) -> list[str]:
    found = {p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern)}
    return sorted(found - _IGNORED)


def has_safetensors(directory: Path) -> bool:
    """Whether ``directory`` holds ``model.safetensors`` or a sharded safetensors index."""
    return (directory / WEIGHTS_NAME).is_file() or (directory / WEIGHTS_INDEX_NAME).is_file()


def load_safetensors_dir(directory: Path, *, what: str) -> dict[str, torch.Tensor]:
    """Load every tensor of ``model.safetensors`` (or its sharded index) in ``directory`` on CPU.

    Args:
        directory: the folder to read.
        what: how to name the folder in error messages.

    Raises:
        ValueError: when there are no safetensors weights; the message says when only pickle weights exist.
    """
    if (directory / WEIGHTS_NAME).is_file():
        return load_file(directory / WEIGHTS_NAME, device="cpu")
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(directory / shard, device="cpu"))
        return state
    pickles = _pickle_files(directory)
    if pickles:
        raise ValueError(
            f"{what} has only pickle weights ({', '.join(pickles)}); pickle files are not loaded (they can run "
            f"arbitrary code). Convert them to safetensors ({WEIGHTS_NAME}) in a trusted environment first."
        )
    raise ValueError(f"{what} has no {WEIGHTS_NAME}")


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(contiguous, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
