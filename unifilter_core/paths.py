"""The data root (``UNIFILTER_HOME``, default ``./.unifilter``) and its layout (design.md)."""

from __future__ import annotations

import os
from pathlib import Path


def data_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``override`` if given, else ``$UNIFILTER_HOME``, else ``./.unifilter``."""
    if override is not None:
        return Path(override).expanduser().resolve()
    return Path(os.environ.get("UNIFILTER_HOME", ".unifilter")).expanduser().resolve()


def sources_dir(root: Path) -> Path:
    return root / "sources"


def synthetic_dir(root: Path, kind: str) -> Path:
    return root / "synthetic" / kind


def pretrain_dir(root: Path) -> Path:
    return root / "pretrain" / "llava_pretrain"


def models_dir(root: Path) -> Path:
    return root / "models"


def scores_dir(root: Path, source: str) -> Path:
    return root / "scores" / source


def filtered_dir(root: Path, source: str) -> Path:
    return root / "filtered" / source


def catalog_path(root: Path) -> Path:
    return root / "unifilter.duckdb"


def partition_key(source: str, tar_path: str | os.PathLike[str]) -> str:
    """``sources/obelics/00000042.tar`` -> ``obelics_0042`` (numeric stem, zero-padded to >= 4 digits)."""
    stem = Path(tar_path).name.split(".")[0]
    if not stem.isdigit():
        raise ValueError(f"tar name {Path(tar_path).name!r} has no numeric stem (expected e.g. 00000042.tar)")
    return f"{source}_{int(stem):04d}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """``obelics_0042`` -> (``obelics``, 42)."""
    source, sep, num = key.rpartition("_")
    if not sep or not source or not num.isdigit():
        raise ValueError(f"partition key {key!r} is not of the form <source>_<NNNN>")
    return source, int(num)
