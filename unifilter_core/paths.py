"""The data root (``UNIFILTER_HOME``, default ``./.unifilter``) and its layout (design.md)."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

# a shard is `<digits>.tar` or MMC4's `shard_<digits>.tar`; ASCII digits only (str.isdigit() accepts `²`)
_SHARD_NAME = re.compile(r"(?:shard_)?([0-9]+)\.tar", re.ASCII)


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


def tables_root(root: Path, override: str | os.PathLike[str] | None = None) -> Any:
    """Where ``scores/`` and ``filtered/`` live: ``override``, else ``$UNIFILTER_TABLES``, else the data root.

    A store URL (``s3://bucket/unifilter``) keeps score tables, manifests and filtered tars on object storage
    while the catalog and everything else stay in the (local) data root. Returns a :class:`~pathlib.Path` or a
    :class:`upath.UPath`.
    """
    from unifilter_core import storage

    chosen = override if override not in (None, "") else os.environ.get("UNIFILTER_TABLES") or None
    return root if chosen is None else storage.resolved(chosen)


def catalog_path(root: Path) -> Path:
    return root / "unifilter.duckdb"


def base_name(path: str | os.PathLike[str] | Any) -> str:
    """The last part of a local path or a store URL (``s3://b/shards/00000042.tar`` -> ``00000042.tar``)."""
    return path.name if not isinstance(path, str) and hasattr(path, "name") else PurePosixPath(str(path)).name


def shard_id(name: str | os.PathLike[str]) -> int | None:
    """The tar id of a shard file name: ``00000042.tar`` and ``shard_42.tar`` -> 42; anything else -> None.

    Only ASCII digits count (``².tar`` is not a shard).
    """
    match = _SHARD_NAME.fullmatch(base_name(name))
    return int(match.group(1)) if match else None


def partition_key(source: str, tar_path: str | os.PathLike[str]) -> str:
    """``sources/obelics/00000042.tar`` -> ``obelics_0042`` (tar id, zero-padded to >= 4 digits)."""
    number = shard_id(tar_path)
    if number is None:
        raise ValueError(
            f"tar name {base_name(tar_path)!r} is not a shard name (expected e.g. 00000042.tar or shard_42.tar)"
        )
    return f"{source}_{number:04d}"


def parse_partition_key(key: str) -> tuple[str, int]:
    """``obelics_0042`` -> (``obelics``, 42)."""
    source, sep, num = key.rpartition("_")
    if not sep or not source or not (num.isascii() and num.isdigit()):
        raise ValueError(f"partition key {key!r} is not of the form <source>_<NNNN>")
    return source, int(num)


def group_key(source: str, first: int, last: int) -> str:
    """The partition key of tars ``first..last`` of a grouped source: ``datacomp_0000-0255``."""
    if not 0 <= first <= last:
        raise ValueError(
            f"a tar group runs from a first to a last tar id (0 <= first <= last), got {first}-{last}"
        )
    return f"{source}_{first:04d}-{last:04d}"


def group_of(tar_id: int, group_size: int) -> tuple[int, int]:
    """The first and last tar id of the group of ``group_size`` tars holding ``tar_id`` (groups start at 0)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    first = tar_id - tar_id % group_size
    return first, first + group_size - 1


def parse_partition(key: str) -> tuple[str, int, int]:
    """A tar key or a group key as ``(source, first tar id, last tar id)``: ``obelics_0042`` ->
    (``obelics``, 42, 42); ``datacomp_0000-0255`` -> (``datacomp``, 0, 255)."""
    source, sep, ids = key.rpartition("_")
    first, dash, last = ids.partition("-")
    numbers = [first, last] if dash else [first]
    if not sep or not source or not all(n.isascii() and n.isdigit() for n in numbers):
        raise ValueError(
            f"partition key {key!r} is not of the form <source>_<NNNN> or <source>_<first>-<last>"
        )
    lo, hi = int(first), int(last) if dash else int(first)
    if hi < lo:
        raise ValueError(f"partition key {key!r}: the last tar id is below the first")
    return source, lo, hi
