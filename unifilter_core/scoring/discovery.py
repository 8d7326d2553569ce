"""Finding the tars to score and the ``--gpu-id`` / ``--tars-per-gpu`` block of them.

A shard is a file directly inside a folder named ``<digits>.tar`` (``00000042.tar``, ``42.tar``) or MMC4's
``shard_<digits>.tar``; its number is the tar id. Other files are skipped with one warning naming them.
``--gpu-id I --tars-per-gpu N`` selects the tars whose ids are in ``[I*N, (I+1)*N)``, as the original scripts
do (ids, not positions: with tars 0, 2 and 5 and N = 2, block 1 is tar 2 alone).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from unifilter_core import storage
from unifilter_core.paths import shard_id
from unifilter_core.storage import Location

logger = logging.getLogger(__name__)

_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")
_PROBE_WIDTH = 12  # zero-padded names probed by find_shard: `42.tar` ... `000000000042.tar`
_SHOWN = 5  # names quoted in warnings and hints


def _absolute(path: Location) -> Location:
    """The absolute path with the folder resolved but not the file: a symlinked shard keeps its own name (a
    store URL is already absolute)."""
    return path if storage.is_url(path) else path.parent.resolve() / path.name


def _listing_hint(names: Sequence[str]) -> str:
    compressed = [n for n in names if n.endswith(_COMPRESSED)]
    if compressed:
        return (
            f" (found {', '.join(compressed[:_SHOWN])}: compressed shards are not read; decompress them "
            "(gunzip -k, unxz -k, zstd -d) or point --tar-file-path at the uncompressed copies)"
        )
    tars = [n for n in names if n.endswith(".tar")][:_SHOWN]
    if tars:
        return f" (found {', '.join(tars)}: names must be <number>.tar or shard_<number>.tar)"
    return ""


def _check_unique(found: Iterable[tuple[int, Path]]) -> dict[int, Path]:
    by_id: dict[int, Path] = {}
    for number, path in found:
        if number in by_id:
            first, second = sorted((by_id[number].name, path.name))
            raise ValueError(
                f"{first} and {second} in {path.parent} are both tar id {number}: keep one of them "
                "(each id must name one shard)"
            )
        by_id[number] = path
    return by_id


_COMPANION_SUFFIXES = ("_stats", "_quality_score")


def _is_companion(name: str, stems: set[str]) -> bool:
    """Hidden entries and a shard's own companions (img2dataset's ``<stem>.parquet`` / ``<stem>_stats.json``,
    original-form ``<stem>_quality_score.parquet`` and manifests): expected next to shards, never warned about."""
    if name.startswith("."):
        return True
    if ".tar" in name:  # 00000000.tar.gz beside 00000000.tar: a shard in another form, worth a warning
        return False
    head = name.split(".")[0]
    for suffix in _COMPANION_SUFFIXES:
        head = head.removesuffix(suffix)
    return head in stems


def _scan(folder: Location) -> tuple[list[tuple[int, Location]], list[str]]:
    """``(id, path)`` of each shard directly in ``folder``, and the names of the other entries (companion
    files of the shards found are left out of both)."""
    found: list[tuple[int, Location]] = []
    others: list[str] = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        number = shard_id(entry.name)
        if number is not None and entry.is_file():
            found.append((number, entry))
        else:
            others.append(entry.name)
    stems = {path.name.split(".")[0] for _, path in found} | {f"{number:08d}" for number, _ in found}
    return found, [name for name in others if not _is_companion(name, stems)]


def discover_tars(path: str | os.PathLike[str]) -> list[Location]:
    """The tars to score under ``path`` (a folder, not recursive) or ``path`` itself (a single shard file).

    Args:
        path: a folder holding ``<NNNNNNNN>.tar`` (or ``shard_<N>.tar``) shards, or one such file; local or a
            store URL (``s3://bucket/shards``: a prefix, listed through fsspec).

    Returns:
        Absolute paths (the folder resolved, a symlinked shard keeps its name; :class:`upath.UPath` for a
        URL) sorted by tar id. Files that are not shards are skipped with one warning naming them.

    Raises:
        ValueError: the path does not exist, is a file that is not a shard, is a folder with no shard (the
            names found are quoted, compressed shards with what to do), or holds two shards of one id.
    """
    root = storage.location(path)
    storage.forget_listings(root)  # another process may have written there since this one last listed it
    if not root.exists():
        raise ValueError(f"tar path {str(root)!r} does not exist")
    if root.is_file():
        if shard_id(root) is None:
            raise ValueError(
                f"{str(root)!r} is not a shard named <number>.tar (e.g. 00000042.tar){_listing_hint([root.name])}"
            )
        return [_absolute(root)]
    if not root.is_dir():
        raise ValueError(f"tar path {str(root)!r} is neither a folder nor a file")
    root = root if storage.is_url(root) else root.resolve()
    found, skipped = _scan(root)
    if not found:
        raise ValueError(f"no <number>.tar shards in folder {str(root)!r}{_listing_hint(skipped)}")
    if skipped:
        shown = ", ".join(skipped[:_SHOWN]) + (
            f" and {len(skipped) - _SHOWN} more" if len(skipped) > _SHOWN else ""
        )
        logger.warning("%s: skipped %d entr%s that are not shards: %s", root, len(skipped),
                       "y" if len(skipped) == 1 else "ies", shown)  # fmt: skip
    by_id = _check_unique(found)
    return [by_id[n] for n in sorted(by_id)]


def block_ids(gpu_id: int, tars_per_gpu: int) -> range:
    """The tar ids of block ``gpu_id``: ``[gpu_id * tars_per_gpu, (gpu_id + 1) * tars_per_gpu)``.

    Raises:
        ValueError: negative ``gpu_id`` or ``tars_per_gpu`` < 1.
    """
    if gpu_id < 0:
        raise ValueError(f"--gpu-id must be >= 0, got {gpu_id}")
    if tars_per_gpu < 1:
        raise ValueError(f"--tars-per-gpu must be >= 1, got {tars_per_gpu}")
    return range(gpu_id * tars_per_gpu, (gpu_id + 1) * tars_per_gpu)


def select_block(tars: Sequence[Path], gpu_id: int, tars_per_gpu: int | None) -> list[Path]:
    """The tars of block ``gpu_id``: those whose id is in :func:`block_ids` (ids, not list positions).

    Args:
        tars: the output of :func:`discover_tars`.
        gpu_id: block index (>= 0).
        tars_per_gpu: block size (>= 1); None means one block holding every tar (then ``gpu_id`` must be 0).

    Returns:
        The block, by id; empty when no tar has an id in the block (a launcher may start more GPUs than
        there are blocks: those have nothing to do).

    Raises:
        ValueError: negative ``gpu_id``, ``tars_per_gpu`` < 1, or ``gpu_id`` > 0 without ``tars_per_gpu``.
    """
    if tars_per_gpu is None:
        if gpu_id < 0:
            raise ValueError(f"--gpu-id must be >= 0, got {gpu_id}")
        if gpu_id != 0:
            raise ValueError("--gpu-id > 0 needs --tars-per-gpu (the block size)")
        return list(tars)
    ids = block_ids(gpu_id, tars_per_gpu)
    return [t for t in tars if shard_id(t) in ids]


def compact_ranges(ids: Iterable[int]) -> str:
    """``[3, 4, 5, 6, 7, 9]`` -> ``"3-7, 9"`` (sorted, duplicates dropped; ``""`` for none)."""
    runs: list[list[int]] = []
    for n in sorted(set(ids)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def candidate_names(number: int) -> list[str]:
    """Shard names probed for tar id ``number``: ``00000042.tar`` first, every zero padding, ``shard_42.tar``."""
    digits = len(str(number))
    padded = [f"{number:0{w}d}" for w in range(max(digits, 1), max(digits, _PROBE_WIDTH) + 1)]
    names = [f"{number:08d}.tar"] + [f"{p}.tar" for p in padded] + [f"shard_{p}.tar" for p in padded]
    return list(dict.fromkeys(names))


def find_shard(folder: Path, number: int) -> Path | None:
    """The shard of tar id ``number`` in ``folder``, probing its likely names before listing the folder.

    A listing (:func:`discover_tars`) is made only when no candidate name exists, so resolving one id in a
    folder of 100k tars costs a few ``stat`` calls.

    Raises:
        ValueError: two files of the folder are this id (the same rule as :func:`discover_tars`).
    """
    hits = [(number, folder / name) for name in candidate_names(number) if (folder / name).is_file()]
    if hits:
        return _absolute(_check_unique(hits)[number])
    if not folder.is_dir():
        return None
    found, _ = _scan(folder.resolve())
    match = _check_unique(found).get(number)
    return _absolute(match) if match is not None else None


def find_shards(folder: Location, first: int, last: int) -> dict[int, Location]:
    """The shards of tar ids ``first..last`` in ``folder``, by id (a tar group's; ids without a tar absent).

    Each id's canonical name (``00000042.tar``) is probed; when none of them exists the folder is listed once
    and its shards in the range are taken, whatever their names. So a group of 256 canonically named tars
    costs 256 ``stat`` calls (or HEAD requests on a store), never a listing of the whole source. Two names of
    one id are refused at registration (:func:`discover_tars`), which lists the folder anyway.
    """
    hits = {n: folder / f"{n:08d}.tar" for n in range(first, last + 1)}
    found = {n: _absolute(p) for n, p in hits.items() if p.is_file()}
    if found or not folder.is_dir():
        return found
    listed, _ = _scan(folder if storage.is_url(folder) else folder.resolve())
    return {n: _absolute(p) for n, p in _check_unique(listed).items() if first <= n <= last}
