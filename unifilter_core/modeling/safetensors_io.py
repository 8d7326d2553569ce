"""Reading and writing weights as safetensors only: pickle files are refused, never loaded."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from unifilter_core.fileio import commit_temp

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
# Not weights: a pickle of training arguments that the released checkpoint carries; it is ignored.
_IGNORED = {"training_args.bin"}
_REPAIR = "re-download it, or re-save the model with save_pretrained"


def _pickle_files(directory: Path) -> list[str]:
    found = {p.name for pattern in _PICKLE_PATTERNS for p in directory.glob(pattern)}
    return sorted(found - _IGNORED)


def has_safetensors(directory: Path) -> bool:
    """Whether ``directory`` holds ``model.safetensors`` or a sharded safetensors index."""
    return (directory / WEIGHTS_NAME).is_file() or (directory / WEIGHTS_INDEX_NAME).is_file()


def weight_files(directory: Path, *, what: str) -> list[Path]:
    """The safetensors files of ``directory``: ``model.safetensors``, or the shards its index lists.

    Args:
        directory: the folder to read.
        what: how to name the folder in error messages.

    Raises:
        ValueError: when there are no safetensors weights; the message says when only pickle weights exist.
    """
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index = directory / WEIGHTS_INDEX_NAME
    if index.is_file():
        return [directory / shard for shard in _shard_names(index)]
    pickles = _pickle_files(directory)
    if pickles:
        raise ValueError(
            f"{what} has only pickle weights ({', '.join(pickles)}); pickle files are not loaded (they can run "
            f"arbitrary code). Convert them to safetensors ({WEIGHTS_NAME}) in a trusted environment first."
        )
    raise ValueError(f"{what} has no {WEIGHTS_NAME}")


def load_safetensors_dir(directory: Path, *, what: str) -> dict[str, torch.Tensor]:
    """Load every tensor of ``model.safetensors`` (or its sharded index) in ``directory`` on CPU.

    Raises:
        ValueError: as :func:`weight_files` and :func:`load_weights_file`.
    """
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory, what=what):
        state.update(load_weights_file(path))
    return state


def weight_keys(directory: Path, *, what: str) -> set[str]:
    """The tensor names stored in ``directory``'s safetensors files, read from their headers only.

    ``safe_open`` checks each header and that the data it describes fits the file, so a broken file is one
    ``ValueError`` before any model is built.

    Raises:
        ValueError: as :func:`weight_files` and :func:`load_weights_file`.
    """
    keys: set[str] = set()
    for path in weight_files(directory, what=what):
        with _readable(path), safe_open(path, framework="pt", device="cpu") as handle:
            keys.update(handle.keys())
    return keys


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on CPU.

    Raises:
        ValueError: the file is missing, empty, truncated or not safetensors; the message names it and says to
            re-download or re-save it.
    """
    with _readable(path):
        return load_file(path, device="cpu")


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    """Turn safetensors / OS errors reading ``path`` into one ``ValueError`` naming the file and the repair."""
    try:
        yield
    except (SafetensorError, OSError) as exc:
        size = path.stat().st_size if path.is_file() else None
        what = "missing" if size is None else "empty" if size == 0 else f"{size} bytes, truncated or corrupt"
        raise ValueError(f"{path} is not a readable safetensors file ({what}: {exc}); {_REPAIR}") from None


def _shard_names(index: Path) -> list[str]:
    """Shard file names listed in a sharded checkpoint's ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{index} is not a valid safetensors index (a JSON object with a 'weight_map' of key -> shard file; "
            f"{type(exc).__name__}: {exc}); {_REPAIR}"
        ) from None
    if not all(isinstance(n, str) and n and "/" not in n and "\\" not in n for n in names):
        raise ValueError(f"{index} names shard files outside its folder or not as strings; {_REPAIR}")
    return names


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` to ``path`` via a temporary file in the same folder, fsync and an atomic rename."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        save_file(contiguous, tmp, metadata={"format": "pt"})
        commit_temp(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
