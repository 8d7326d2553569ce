"""Partitions of one tar or of a group of tars (design.md "Partitions"), and scoring a partition's tars with
one model load, in this process or on a Ray cluster.

A source with ``group_size`` K > 1 has one partition per K consecutive tar ids: ``datacomp_0000-0255`` holds
tars 0..255 (those that exist). The tar stays the unit of the data: each has its own score table, manifest
(per-tar resume) and ``score_stats`` row keyed by its own tar key (``datacomp_0042``); the group is the unit
of work (one run, one model load). With K = 1 a partition is one tar, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unifilter_core import paths
from unifilter_core.catalog import Catalog, TarRecord
from unifilter_core.partition_steps import (
    TarSource,
    check_sources,
    filter_partition,
    score_table_path,
    tables_location,
)
from unifilter_core.storage import Location

logger = logging.getLogger(__name__)

_MARKER_HINT = "move or delete that score folder, or give this source another name"


@dataclass(frozen=True)
class PartitionTars:
    """The tars of one partition key.

    Attributes:
        spec: their source.
        key: the partition key (``obelics_0042`` or ``datacomp_0000-0255``).
        tars: ``(tar key, tar path)`` by tar id; a group lists the ids of its range that have a tar.
    """

    spec: TarSource
    key: str
    tars: list[tuple[str, Location]]

    @property
    def grouped(self) -> bool:
        return "-" in self.key.rpartition("_")[2]


def partition_of(tar_key: str, sources: Sequence[TarSource] | dict[str, TarSource]) -> str | None:
    """The partition holding a registered tar (``datacomp_0042`` -> ``datacomp_0000-0255`` when the source
    groups 256); None when its source is not configured."""
    by_name = sources if isinstance(sources, dict) else check_sources(sources)
    source, number = paths.parse_partition_key(tar_key)
    spec = by_name.get(source)
    return spec.partition_of(number) if spec is not None else None


def partition_keys(records: Iterable[TarRecord], sources: Sequence[TarSource]) -> list[str]:
    """The partition keys covering ``records`` (each once, sorted): tar keys, or group keys for grouped
    sources."""
    by_name = check_sources(sources)
    keys = {partition_of(r.partition_key, by_name) for r in records}
    return sorted(k for k in keys if k is not None)


def resolve_tars(root: Path, sources: Sequence[TarSource], key: str) -> PartitionTars:
    """The source and tars of a partition key (raises ValueError saying what to do when there are none).

    A tar key (``obelics_0042``) names one tar, also under a grouped source (to rescore one tar alone). A group
    key must be one of its source's groups (``datacomp_0000-0255`` for ``group_size`` 256).
    """
    from unifilter_core.partition_steps import resolve_partition
    from unifilter_core.scoring.discovery import find_shards

    source, first, last = paths.parse_partition(key)
    if "-" not in key.rpartition("_")[2]:
        spec, tar = resolve_partition(root, sources, key)
        return PartitionTars(spec, key, [(key, tar)])
    by_name = check_sources(sources)
    if source not in by_name:
        raise ValueError(f"partition {key!r}: source {source!r} is not configured ({sorted(by_name)})")
    spec = by_name[source]
    if spec.group_size == 1 or (first, last) != paths.group_of(first, spec.group_size):
        raise ValueError(
            f"partition {key!r}: source {source!r} has group_size {spec.group_size}, so its partitions are "
            f"{spec.partition_of(first)!r} and the like; register tars with tar_manifest"
        )
    folder = spec.directory(root)
    found = find_shards(folder, first, last)
    if not found:
        raise ValueError(f"partition {key!r}: no tar numbered {first}..{last} under {folder}")
    return PartitionTars(spec, key, [(f"{source}_{n:04d}", found[n]) for n in sorted(found)])


@dataclass(slots=True)
class TarResult:
    """What scoring one tar of a partition gave: its summary (``TarScoreSummary``), table and statistics."""

    tar_key: str
    summary: Any
    table: str
    stats: dict[str, Any] | None = None
    drift: Any = None


def tars_to_score(
    root: Path, part: PartitionTars, request_keys: dict[str, str], *, tables: Location | None = None
) -> list[str]:
    """The tar keys of ``part`` whose table does not record their ``request_keys`` entry (reads manifests only:
    a partition with none left to score needs neither the model nor its tars)."""
    from unifilter_core.scoring.resume import resumable_manifest

    where = tables_location(root, tables)
    return [
        tar_key
        for tar_key, tar in part.tars
        if resumable_manifest(score_table_path(where, part.spec.name, tar), request_keys[tar_key]) is None
    ]


def score_partition_tars(
    root: Path,
    part: PartitionTars,
    *,
    request_keys: dict[str, str],
    load: Callable[[], Any],
    config: Any = None,
    catalog: Catalog | None = None,
    tables: Location | None = None,
    ray: Any = None,
    progress: bool = False,
    drift: Any = None,
    drift_reference: Sequence[str] = (),
    canary_tolerance: float | None = None,
    todo: Iterable[str] | None = None,
) -> list[TarResult]:
    """Score the tars of one partition, each into its own table, loading the model at most once.

    A tar whose manifest records its ``request_keys`` entry is answered from the manifest (neither the model
    nor the tar is read). The others are scored by one model from ``load()`` (called only when some tar needs
    it) or, with ``ray`` (a :class:`~unifilter_core.scoring.ray_engine.RayTarget`), by the cluster's actors.
    A tar that cannot be scored is that tar's failed summary (``summary.error``); the others go on. Statistics
    of every table are recorded in ``catalog`` in one write; with ``drift`` (:class:`unifilter_core.drift.
    DriftLimits`) each tar is also compared with its reference (the model's validation pairs, or the tars
    ``drift_reference`` names) and the result recorded in ``score_drift`` (``TarResult.drift``). With
    ``canary_tolerance`` a local run first scores the model's canary set (:mod:`unifilter_core.canary`) and records
    the result in the manifest of each tar it scores (``canary``). ``todo``: the caller's
    :func:`tars_to_score` (default: found here).

    Raises:
        SourceMismatchError: the score folder holds tables of another input folder (a ValueError).
    """
    from unifilter_core.scoring.source_marker import check_source_marker, write_source_marker
    from unifilter_core.scoring.summary import summary_from_manifest

    spec = part.spec
    where = tables_location(root, tables, catalog)
    out_dir = paths.scores_dir(where, spec.name)
    input_dir = part.tars[0][1].parent
    check_source_marker(out_dir, spec.name, input_dir, hint=_MARKER_HINT)
    todo = set(tars_to_score(root, part, request_keys, tables=where) if todo is None else todo)
    results: dict[str, TarResult] = {}
    for tar_key, tar in part.tars:
        if tar_key not in todo:
            table = score_table_path(where, spec.name, tar)
            results[tar_key] = TarResult(tar_key, summary_from_manifest(tar, table, tar_key), str(table))
    if todo:
        scorer = load() if ray is None else None  # a checkpoint that does not load fails before any write
        canary = None
        if scorer is not None and canary_tolerance is not None:
            from unifilter_core.reference import run_canary

            canary = run_canary(root, scorer, spec.kind, canary_tolerance)
        write_source_marker(out_dir, spec.name, input_dir)
        tars = [tar for tar_key, tar in part.tars if tar_key in todo]
        keys = {str(tar): request_keys[tar_key] for tar_key, tar in part.tars if tar_key in todo}
        by_name = {
            paths.base_name(tar): tar_key for tar_key, tar in part.tars
        }  # summaries come back in any order
        if ray is not None:
            summaries = ray.score(tars, out_dir, kind=spec.kind, source=spec.name, request_keys=keys)
        else:
            from unifilter_core.scoring import score_tars

            summaries = score_tars(tars, scorer, out_dir, kind=spec.kind, source=spec.name, config=config,
                                   progress=progress, request_keys=keys,
                                   manifest_extra={"canary": canary} if canary else None)  # fmt: skip
        for summary in summaries:
            tar_key = by_name[paths.base_name(summary.tar_path)]
            results[tar_key] = TarResult(tar_key, summary, str(summary.table_path))
    ordered = [results[tar_key] for tar_key, _ in part.tars]
    if catalog is not None:
        done = [(r.tar_key, r.table) for r in ordered if r.summary.error is None]
        by_key = {s.partition_key: asdict(s) for s in catalog.record_score_stats_many(done)}
        for r in ordered:
            r.stats = by_key.get(r.tar_key)
        if drift is not None:
            from unifilter_core.drift import check_tars

            rows = check_tars(root, catalog, spec.kind, list(by_key.values()), drift, drift_reference)
            by_tar = {row.partition_key: row for row in rows}
            for r in ordered:
                r.drift = by_tar.get(r.tar_key)
    return ordered


def filter_partition_tars(root: Path, part: PartitionTars, *, tables: Location | None = None) -> list[dict]:
    """:func:`~unifilter_core.partition_steps.filter_partition` for each tar of a partition (in tar order)."""
    return [filter_partition(root, part.spec, tar, tar_key, tables=tables) for tar_key, tar in part.tars]
