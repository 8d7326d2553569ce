"""The platform's steps on one partition (one tar) or on the whole catalog: discovery, scoring, resume,
thresholds, filtering; the Dagster assets are thin wrappers around them.

Each function returns a plain dict of figures the caller reports (Dagster metadata, logs). Nothing here imports
dagster. A step whose input does not exist yet raises :class:`MissingInput` naming what is missing; the caller
says how to make it. The ``unifilter`` CLI uses the same engine and catalog functions directly.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unifilter_core import paths, storage
from unifilter_core.catalog import Catalog, TarRecord, ThresholdRow
from unifilter_core.records import SAMPLE_KINDS, SampleKind
from unifilter_core.storage import Location

logger = logging.getLogger(__name__)

_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
THRESHOLDS_FILE = "thresholds.json"


class MissingInput(ValueError):
    """A step's input does not exist yet. ``needs`` names what makes it: ``scores`` (score tables) or
    ``thresholds`` (chosen thresholds); the Dagster assets and the CLI word the advice."""

    def __init__(self, message: str, needs: str) -> None:
        super().__init__(message)
        self.needs = needs


@dataclass(frozen=True)
class TarSource:
    """One input source: a folder of ``<NNNNNNNN>.tar`` shards of one kind.

    Attributes:
        name: source name, the partition-key prefix (``datacomp`` -> ``datacomp_0042``).
        kind: ``caption`` (DataComp/img2dataset layout) or ``interleaved`` (OBELICS layout).
        path: the folder holding the tars, or a store URL (``s3://bucket/shards``); None =
            ``<data root>/sources/<name>``.
        group_size: tars per partition. 1 (default): one partition per tar (``datacomp_0042``); K > 1: one
            partition per K consecutive tar ids (``datacomp_0000-0255``), scored with one model load.
    """

    name: str
    kind: SampleKind
    path: str | None = None
    group_size: int = 1

    def __post_init__(self) -> None:
        if not _SOURCE_NAME.match(self.name):
            raise ValueError(
                f"source name {self.name!r} must start with a lowercase letter and hold only a-z, 0-9, '_' or '-'"
            )
        if self.kind not in SAMPLE_KINDS:
            raise ValueError(
                f"source {self.name!r}: kind must be one of {', '.join(map(repr, SAMPLE_KINDS))}, got {self.kind!r}"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(
                f"source {self.name!r}: group_size must be an integer >= 1, got {self.group_size!r}"
            )

    def partition_of(self, tar_id: int) -> str:
        """The partition key holding tar ``tar_id``: the tar's own key, or its group's (``datacomp_0000-0255``)."""
        if self.group_size == 1:
            return f"{self.name}_{tar_id:04d}"
        return paths.group_key(self.name, *paths.group_of(tar_id, self.group_size))

    def directory(self, root: Path) -> Location:
        return storage.resolved(self.path) if self.path else paths.sources_dir(root) / self.name


DEFAULT_SOURCES: tuple[TarSource, ...] = (
    TarSource("datacomp", "caption"),
    TarSource("obelics", "interleaved"),
)


def check_sources(sources: Sequence[TarSource]) -> dict[str, TarSource]:
    """Sources by name; raises ValueError on an empty list or a duplicate name."""
    if not sources:
        raise ValueError("no sources configured: give at least one (name, kind, path)")
    by_name: dict[str, TarSource] = {}
    for spec in sources:
        if spec.name in by_name:
            raise ValueError(f"source {spec.name!r} is configured twice")
        by_name[spec.name] = spec
    return by_name


def discover_tar_records(root: Path, sources: Sequence[TarSource]) -> list[TarRecord]:
    """Every ``<NNNNNNNN>.tar`` under the sources, as catalog records (sorted by partition key).

    A missing default folder (``<root>/sources/<name>``) contributes nothing (logged); a folder given explicitly
    (``spec.path``) that does not exist raises ValueError, since that is a typo, not "no tars yet". Two tars
    that map to the same partition key (``42.tar`` and ``00000042.tar``) raise ValueError: the key must name
    one tar.
    """
    from unifilter_core.scoring.discovery import discover_tars

    records: dict[str, TarRecord] = {}
    for spec in check_sources(sources).values():
        folder = spec.directory(root)
        if not folder.is_dir():
            if spec.path:
                raise ValueError(
                    f"source {spec.name!r}: configured folder {folder} does not exist (check its `path`)"
                )
            logger.warning("source %s: folder %s does not exist (no tars)", spec.name, folder)
            continue
        for tar in discover_tars(folder):
            key = paths.partition_key(spec.name, tar)
            if key in records:
                raise ValueError(f"tars {records[key].path} and {tar} both map to partition {key!r}")
            st = tar.stat()
            records[key] = TarRecord(key, spec.name, str(tar), spec.kind, st.st_size, st.st_mtime, None)
    return [records[k] for k in sorted(records)]


def resolve_partition(root: Path, sources: Sequence[TarSource], partition_key: str) -> tuple[TarSource, Path]:
    """The source and tar of a partition key, found on disk (raises ValueError with what to do if absent).

    The tar's likely names are probed first (``00000042.tar``, ``42.tar``, ``shard_42.tar``, ...); the
    source folder is listed only when none exists, so a run does not list a folder of 100k tars.
    """
    from unifilter_core.scoring.discovery import find_shard

    source, number = paths.parse_partition_key(partition_key)
    by_name = check_sources(sources)
    if source not in by_name:
        raise ValueError(
            f"partition {partition_key!r}: source {source!r} is not configured ({sorted(by_name)})"
        )
    spec = by_name[source]
    folder = spec.directory(root)
    tar = find_shard(folder, number)
    if tar is None:
        raise ValueError(f"partition {partition_key!r}: no tar numbered {number} under {folder}")
    return spec, tar


def tables_location(root: Path, tables: Location | None = None, catalog: Catalog | None = None) -> Location:
    """Where score tables and filtered tars go: ``tables``, else the catalog's, else
    :func:`unifilter_core.paths.tables_root` (``$UNIFILTER_TABLES`` or the data root)."""
    if tables is not None:
        return paths.tables_root(root, tables)
    return catalog.tables if catalog is not None else paths.tables_root(root)


def score_table_path(tables: Location, source: str, tar: Location) -> Location:
    """``<tables>/scores/<source>/<stem>.parquet`` (``tables``: the data root or a store URL)."""
    return paths.scores_dir(tables, source) / f"{tar.name.split('.')[0]}.parquet"


def filtered_tar_path(tables: Location, source: str, tar: Location) -> Location:
    return paths.filtered_dir(tables, source) / tar.name


def choose_thresholds(
    root: Path,
    catalog: Catalog,
    *,
    keep_fraction: float | None = None,
    absolute: float | None = None,
    model_fingerprint: str | None = None,
    method: str = "auto",
) -> list[ThresholdRow]:
    """Compute (and record in the catalog) one threshold per source; write ``<root>/thresholds.json``.

    ``method``: see :meth:`~unifilter_core.catalog.Catalog.compute_threshold` (``auto``: an exact scan up to
    10,000 tables, the statistics recorded at scoring time beyond).

    Raises:
        ValueError: invalid keep fraction / absolute score / method.
        MissingInput: no scored rows at all.
    """
    rows = catalog.compute_threshold(
        keep_fraction=keep_fraction, absolute=absolute, record=True, model_fingerprint=model_fingerprint,
        method=method,
    )  # fmt: skip
    if not rows:
        raise MissingInput("no scored samples yet", needs="scores")
    doc = {r.source: r.to_dict() for r in rows}
    from unifilter_core.data import write_manifest_json

    write_manifest_json(root / THRESHOLDS_FILE, json.loads(json.dumps(doc, default=str)))
    return rows


def score_quantiles_by_source(
    catalog: Catalog, points: int = 201, method: str = "exact"
) -> dict[str, list[float]]:
    """``points`` evenly spaced quantiles (0..1) of each source's ok scores.

    A compact stand-in for millions of scores when drawing a CDF (``unifilter_core.plots.threshold_cdf_png``).
    ``exact``: computed by DuckDB over every score table; ``stats``: read off the fine histograms (to one bin).
    Sources without an ok score are absent.
    """
    if points < 2:
        raise ValueError(f"points must be >= 2, got {points}")
    levels = [i / (points - 1) for i in range(points)]
    if method == "stats":
        from unifilter_core.catalog.schema import FINE_LO, FINE_WIDTH

        _, rows = catalog.query(
            "SELECT source, bin, sum(n) FROM score_hist GROUP BY ALL ORDER BY source, bin"
        )
        by_source: dict[str, list[tuple[int, int]]] = {}
        for source, b, n in rows:
            by_source.setdefault(str(source), []).append((int(b), int(n)))
        out = {}
        for source, bins in by_source.items():
            edges = np.array(
                [FINE_LO + b * FINE_WIDTH for b, _ in bins] + [FINE_LO + (bins[-1][0] + 1) * FINE_WIDTH]
            )
            cum = np.concatenate([[0.0], np.cumsum([n for _, n in bins])]) / sum(n for _, n in bins)
            out[source] = [float(np.interp(q, cum, edges)) for q in levels]
        return out
    listed = ", ".join(repr(q) for q in levels)
    _, rows = catalog.query(
        f"SELECT source, quantile_cont(score, [{listed}]) FROM scores "
        "WHERE status = 'ok' AND isfinite(score) GROUP BY source ORDER BY source"
    )
    return {str(source): [float(v) for v in values] for source, values in rows if values}


def read_thresholds(root: Path) -> dict[str, dict[str, Any]]:
    """The thresholds chosen last (``<root>/thresholds.json``); raises :class:`MissingInput` when none were."""
    path = root / THRESHOLDS_FILE
    if not path.is_file():
        raise MissingInput(f"no thresholds chosen yet ({path} missing)", needs="thresholds")
    return json.loads(path.read_text())


def kept_keys(table: Location, threshold: float) -> tuple[set[str], list[str]]:
    """Keys of the ok rows of a score table with ``score >= threshold``, and the uids among them."""
    import pyarrow.parquet as pq

    with storage.location(table).open("rb") as handle:
        cols = pq.read_table(handle, columns=["key", "uid", "score", "status"]).to_pydict()
    keep: set[str] = set()
    uids: list[str] = []
    for key, uid, score, status in zip(cols["key"], cols["uid"], cols["score"], cols["status"], strict=True):
        if status == "ok" and score is not None and np.isfinite(score) and score >= threshold:
            keep.add(key)
            if uid:
                uids.append(uid)
    return keep, uids


def uids_to_datacomp_subset(uids: Iterable[str]) -> np.ndarray:
    """DataComp's subset format: a sorted structured array of dtype ``u8,u8`` (the 128-bit uid as two halves).

    Raises:
        ValueError: a uid that is not 32 hex digits.
    """
    pairs = []
    for uid in uids:
        if len(uid) != 32 or not all(c in "0123456789abcdefABCDEF" for c in uid):
            raise ValueError(f"uid {uid!r} is not a 32-hex-digit DataComp uid")
        pairs.append((int(uid[:16], 16), int(uid[16:], 16)))
    arr = np.array(sorted(pairs), dtype=np.dtype("u8,u8"))
    return arr


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    from unifilter_core.data import atomic_output

    with atomic_output(path) as fh:
        np.save(fh, array, allow_pickle=False)


def filter_partition(
    root: Path, spec: TarSource, tar: Location, partition_key: str, *, tables: Location | None = None
) -> dict[str, Any]:
    """Write the kept samples of one tar (score >= its source's chosen threshold) as a webdataset tar.

    Also writes ``<stem>.manifest.json`` and, for caption sources whose samples carry DataComp uids,
    ``<stem>.uids.npy`` in the DataComp resharder's subset format. Under a store URL
    (:func:`tables_location`) the files are written to a local staging folder and published with the manifest
    last (:func:`unifilter_core.storage.publish`): a reader trusts a filtered tar only with its manifest.

    Raises:
        MissingInput: no threshold chosen for the source, or no score table for the tar.
    """
    from unifilter_core.data import write_manifest_json

    thresholds = read_thresholds(root)
    if spec.name not in thresholds:
        raise MissingInput(f"no threshold chosen for source {spec.name!r}", needs="thresholds")
    threshold = float(thresholds[spec.name]["threshold"])
    where = tables_location(root, tables)
    table = score_table_path(where, spec.name, tar)
    if not table.is_file():
        raise MissingInput(f"partition {partition_key!r} has no score table {table}", needs="scores")
    keep, uids = kept_keys(table, threshold)
    final = filtered_tar_path(where, spec.name, tar)
    manifest_name = f"{tar.name.split('.')[0]}.manifest.json"
    if not storage.is_url(final):
        result, _ = _write_filtered(
            spec, tar, partition_key, threshold, keep, uids, final.parent, final.parent
        )
        write_manifest_json(final.parent / manifest_name, result)
        return result
    with tempfile.TemporaryDirectory(prefix="unifilter-stage-") as stage:
        result, written = _write_filtered(
            spec, tar, partition_key, threshold, keep, uids, Path(stage), final.parent
        )
        manifest = write_manifest_json(Path(stage) / manifest_name, result)
        storage.publish(
            [(p, final.parent / p.name) for p in written], (manifest, final.parent / manifest_name)
        )
    return result


def _write_filtered(
    spec: TarSource,
    tar: Location,
    partition_key: str,
    threshold: float,
    keep: set[str],
    uids: list[str],
    folder: Path,
    shown: Location,
) -> tuple[dict[str, Any], list[Path]]:
    """The filtered tar (and DataComp subset) of one tar, written into local ``folder``.

    Returns:
        The manifest's body (paths as they will be under ``shown``, the final folder) and the files written.
    """
    from unifilter_core.data import write_filtered_tar

    out = folder / tar.name
    summary = write_filtered_tar(tar, keep, out)
    stem = tar.name.split(".")[0]
    result: dict[str, Any] = {
        "partition_key": partition_key,
        "source": spec.name,
        "threshold": threshold,
        "kept": summary.kept,
        "dropped": summary.dropped,
        "unsafe": summary.unsafe,
        "path": str(shown / out.name),
        **{k: v for k, v in summary.to_dict().items() if k not in ("kept", "dropped", "unsafe")},
    }
    if spec.kind == "caption" and uids:
        try:
            array = uids_to_datacomp_subset(uids)
        except ValueError as exc:  # uids of another dataset (LAION keys, ...): the filtered tar is still good
            result["datacomp_subset_skipped"] = str(exc)
            logger.info("%s: no DataComp subset file: %s", partition_key, exc)
        else:
            subset = folder / f"{stem}.uids.npy"
            write_npy_atomic(subset, array)
            result["datacomp_subset"] = str(shown / subset.name)
            return result, [out, subset]
    return result, [out]
