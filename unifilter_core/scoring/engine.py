"""The scoring engine: one webdataset tar in, one atomic score table (+ manifest) out.

Flow for one tar (see ``pipeline.py`` for the workers, ``batching.py`` for bucketing, ``table.py`` for files)::

    workers: read tar -> decode -> preprocess ──bounded queues──> main: window of W samples
    main: sort window by length -> batches -> scorer.forward (inference mode) -> rows in tar order -> parquet row group
    end:  parquet tmp -> fsync -> rename; manifest tmp -> fsync -> rename

Memory is bounded by a window plus the workers' queues, whatever the tar size. Every sample yields exactly one
row (``ok``, ``skipped`` or ``error`` with a reason code); a failing model batch is retried sample by sample.

Isolation, so one bad sample never costs its tar and no sample vanishes:

* an exception while preparing a sample is that sample's ``internal_error`` row (``pipeline.prepare_item``);
* a decode worker that dies (OOM killer, segfault) costs the chunk in flight, whose samples are retried alone;
  a sample that kills its process again is a ``worker_crash`` row (``pool.DecodePool``);
* after the table is written an independent header walk of the tar (``data.listing``) is compared with the
  keys written; the manifest's ``listing`` records the result (``missing_keys`` must be 0);
* in :func:`score_tars`, a tar that still fails yields a summary with ``error`` and the block goes on;
* one lock file per table serialises runs scoring the same tar into the same folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import unifilter_core
from unifilter_core import storage
from unifilter_core.cpus import available_cpus
from unifilter_core.data import tar_fingerprint
from unifilter_core.data.text import escape_unencodable
from unifilter_core.paths import base_name
from unifilter_core.paths import partition_key as make_partition_key
from unifilter_core.progress import progress as _progress
from unifilter_core.progress import progress_enabled
from unifilter_core.scoring.batching import BatchRunner
from unifilter_core.scoring.config import (
    OutputFormat,
    SampleKind,
    ScoringConfig,
    canonical_config,
    scorer_dtype,
)
from unifilter_core.scoring.output import OutputError, output_errors
from unifilter_core.scoring.outputs import listing_record, open_writer, output_paths, start_listing
from unifilter_core.scoring.pool import DecodePool
from unifilter_core.scoring.samples import SampleItem, iter_items, short_error
from unifilter_core.scoring.summary import TarScoreSummary, summary_from_manifest
from unifilter_core.scoring.table import (
    MANIFEST_FORMAT_VERSION,
    Counts,
    ManifestKey,
    ScoreRow,
    clean_stale_temp_files,
    config_hash,
    is_complete,
    manifest_path_for,
    read_manifest,
    table_lock,
    write_manifest,
)

logger = logging.getLogger(__name__)


def _windows(items: Iterator[SampleItem], config: ScoringConfig) -> Iterator[list[SampleItem]]:
    """Group the ordered stream into windows of ``window_size`` samples or ``max_window_bytes`` pixel bytes.

    The first window holds one batch and each next one twice as many, up to ``window_size``: the model starts
    as soon as one batch is decoded instead of waiting for a whole window (which would serialise small tars).
    """
    window: list[SampleItem] = []
    pixel_bytes = 0
    limit = min(config.batch_size, config.window_size)
    for item in items:
        window.append(item)
        pixel_bytes += item.pixel_bytes
        if len(window) >= limit or pixel_bytes >= config.max_window_bytes:
            yield window
            window, pixel_bytes = [], 0
            limit = min(2 * limit, config.window_size)
    if window:
        yield window


def _score_window(window: list[SampleItem], runner: BatchRunner, config: ScoringConfig) -> list[ScoreRow]:
    ready = [item for item in window if item.prepared is not None]
    scored = runner.run_window([item.prepared for item in ready], config.batch_size, config.max_batch_tokens)
    by_index = {item.index: result for item, result in zip(ready, scored, strict=True)}
    rows = []
    for item in window:
        result = item.failure if item.prepared is None else by_index[item.index]
        assert result is not None
        rows.append(ScoreRow(item.key, item.uid, item.url, result, item.flags, item.meta))
    return rows


@contextlib.contextmanager
def _model_threads(scorer: Any, config: ScoringConfig) -> Iterator[None]:
    """On CPU, run the model with the cores the decode workers leave free (restored afterwards)."""
    device = getattr(scorer, "device", None)
    if device is not None and torch.device(device).type != "cpu":
        yield
        return
    wanted = config.torch_threads or max(1, available_cpus() - config.num_workers)
    previous = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _build_manifest(job: _Job, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "tar": {
            "path": str(job.tar),  # as given (absolute), never resolved: a symlinked shard keeps its name
            "resolved_path": str(job.tar.resolve()),
            "name": job.tar.name,
            "bytes": job.tar.stat().st_size,
            "fingerprint": job.key.tar_fingerprint,
        },
        "model_fingerprint": job.key.model_fingerprint,
        "config": job.canon,
        "config_hash": job.key.config_hash,
        "code_version": unifilter_core.__version__,
        **({"request_key": job.request_key} if job.request_key else {}),
        **meta,
    }


def score_tar(
    tar_path: str | os.PathLike[str],
    scorer: Any,
    out_path: str | os.PathLike[str],
    *,
    kind: SampleKind | str,
    source: str,
    partition_key: str | None = None,
    config: ScoringConfig | None = None,
    progress: bool = True,
    force: bool = False,
    pool: DecodePool | None = None,
    output_format: OutputFormat | str = OutputFormat.UNIFILTER,
    request_key: str | None = None,
    scored_by: dict[str, Any] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> TarScoreSummary:
    """Score every sample of one tar into ``out_path`` (a parquet score table) and its manifest sidecar.

    Skips the work when ``out_path`` and its manifest exist and record the same tar fingerprint, model
    fingerprint and config hash (unless ``force``). Otherwise the table is rebuilt in a temporary file and
    replaces the old one only once complete.

    Args:
        tar_path: the input shard (``<NNNNNNNN>.tar``).
        scorer: a loaded ``Scorer`` (its ``processor`` prepares samples, ``forward`` scores them).
        out_path: the score table path, ``<out_dir>/<NNNNNNNN>.parquet``; the manifest goes next to it.
        kind: ``caption`` or ``interleaved``.
        source: the source name (``source`` column, partition key prefix).
        partition_key: the partition key; derived from ``source`` and the tar name when None.
        config: engine options (defaults when None).
        progress: show a bar (:mod:`unifilter_core.progress`: when stderr is a terminal or $UNIFILTER_PROGRESS=1).
        force: rescore even when an up-to-date table exists.
        pool: decode workers to reuse across tars (:func:`score_tars` passes one); None = a private pool when
            ``config.num_workers`` > 0, in-process decoding otherwise.
        output_format: ``unifilter`` (our table, the default) or ``original`` (the original scripts' columns:
            the sample json fields and ``quality_score``, see :mod:`~unifilter_core.scoring.original_format`;
            ``out_path`` is then ``<out_dir>/<stem>_quality_score.parquet``). Manifest, resume and locking
            work the same for both.
        request_key: the caller's :func:`~unifilter_core.scoring.resume.request_key`, recorded in the manifest
            (also when the table is found up to date), so the next identical request resumes without loading
            the model or reading the tar.
        scored_by: where the scoring ran (a Ray worker's node id and host), recorded in the manifest as
            ``scored_by``; None records ``"local"``.
        manifest_extra: more entries for the manifest of a newly scored table (the run's ``canary`` check).

    Returns:
        A :class:`TarScoreSummary`.

    Identity: the tar is named as given (made absolute, symlinks not resolved), so a symlinked shard
    ``00000007.tar -> 00000000.tar`` is partition ``<source>_0007``; its fingerprint reads through the link.

    Concurrency: the table's lock file (:func:`~unifilter_core.scoring.table.table_lock`) is held while
    scoring; a second run on the same table waits, then finds it complete and skips it.

    Raises:
        ValueError: bad arguments (unknown kind, output path not ending in ``.parquet``, missing tar).
        WorkerCrashed: the tar cannot be read to its end (a sample that kills a worker only costs its row).
        OutputError: the table, manifest or lock cannot be written (disk full, read-only, permissions).
    """
    tar = storage.absolute(tar_path)  # not resolve(): a symlinked shard keeps its own name and partition
    table = storage.location(out_path)
    if not tar.is_file():
        raise ValueError(f"tar {str(tar)!r} does not exist")
    if table.suffix != ".parquet":
        raise ValueError(f"out_path must end with .parquet, got {str(table)!r}")
    kind = SampleKind(kind)
    output_format = OutputFormat(output_format)
    config = config or ScoringConfig()
    pkey = partition_key or make_partition_key(source, tar)
    manifest_path = manifest_path_for(table)
    canon = canonical_config(kind, config, scorer)
    key = ManifestKey(tar_fingerprint(tar), str(scorer.model_fingerprint), config_hash(canon))
    if not force and is_complete(table, key):
        logger.info("%s is up to date (%s), skipping", table.name, pkey)
        _record_request_key(table, request_key)
        return summary_from_manifest(tar, table, pkey)

    job = _Job(
        tar, table, manifest_path, kind, source, pkey, key, canon, output_format, request_key, scored_by,
        manifest_extra or {},
    )  # fmt: skip
    if storage.is_url(table):
        return _score_to_store(job, scorer, config, progress, pool)
    with output_errors(table.parent):
        table.parent.mkdir(parents=True, exist_ok=True)
    with table_lock(table):
        if not force and is_complete(table, key):  # another run finished it while this one waited
            logger.info("%s was completed by another run (%s), skipping", table.name, pkey)
            _record_request_key(table, request_key, locked=True)
            return summary_from_manifest(tar, table, pkey)
        clean_stale_temp_files(table.parent, table.name.split(".")[0])  # only under the lock: no live writer
        with _decode_pool(pool, scorer, config) as decode:
            return _score(job, scorer, config, progress, decode)


@contextlib.contextmanager
def _decode_pool(pool: DecodePool | None, scorer: Any, config: ScoringConfig) -> Iterator[DecodePool | None]:
    """The caller's pool; else, when ``config`` asks for workers, a private one for this tar (closed after)."""
    if pool is not None or config.num_workers == 0:
        yield pool
        return
    own = DecodePool(scorer.processor, config)
    try:
        yield own
    finally:
        own.close()


def _score_to_store(
    job: _Job, scorer: Any, config: ScoringConfig, progress: bool, pool: DecodePool | None
) -> TarScoreSummary:
    """Score into a local staging folder, then publish table and manifest to the store (manifest last).

    A store has no rename and no lock file: the table is committed by its manifest
    (:func:`unifilter_core.storage.publish`). Two runs scoring the same tar write equal tables; the last
    manifest wins. A run killed before the publish leaves nothing on the store for this tar.
    """
    with (
        _decode_pool(pool, scorer, config) as decode,
        tempfile.TemporaryDirectory(prefix="unifilter-stage-") as stage,
    ):
        local_table = Path(stage) / job.table.name
        local = replace(job, table=local_table, manifest_path=manifest_path_for(local_table))
        summary = _score(local, scorer, config, progress, decode)
        storage.publish([(local_table, job.table)], (local.manifest_path, job.manifest_path))
    summary.table_path, summary.manifest_path = job.table, job.manifest_path
    return summary


@dataclass(slots=True)
class _Job:
    """What one :func:`score_tar` call scores and where it writes."""

    tar: Path
    table: Path
    manifest_path: Path
    kind: SampleKind
    source: str
    pkey: str
    key: ManifestKey
    canon: dict[str, Any]
    output_format: OutputFormat = OutputFormat.UNIFILTER
    request_key: str | None = None
    scored_by: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _record_request_key(table: Path, request_key: str | None, *, locked: bool = False) -> None:
    """Store ``request_key`` in an up-to-date table's manifest when it records another one (under the lock)."""
    manifest_path = manifest_path_for(table)
    if request_key is None or (read_manifest(manifest_path) or {}).get("request_key") == request_key:
        return
    try:
        with contextlib.nullcontext() if locked or storage.is_url(table) else table_lock(table):
            manifest = read_manifest(manifest_path)
            if manifest is not None:
                write_manifest(manifest_path, {**manifest, "request_key": request_key})
    except OSError as exc:  # only a shortcut for the next run is lost
        logger.warning("could not record the request key in %s: %s", manifest_path, exc)


def _score(
    job: _Job, scorer: Any, config: ScoringConfig, progress: bool, pool: DecodePool | None
) -> TarScoreSummary:
    started_at = datetime.now(timezone.utc)
    start = time.perf_counter()
    runner = BatchRunner(scorer)
    counts = Counts()
    written_keys: set[str] = set()
    walk = start_listing(job.tar)  # the integrity walk overlaps the scoring
    if pool is not None:
        items = pool.stream(job.tar, job.kind)
    else:
        items = iter_items(job.tar, job.kind, scorer.processor, config.reader_limits)
    key = job.key
    metadata = {
        "tar_fingerprint": key.tar_fingerprint,
        "config_hash": key.config_hash,
        "partition_key": job.pkey,
    }
    with (
        open_writer(
            job.output_format,
            job.table,
            scorer=scorer,
            source=job.source,
            partition_key=job.pkey,
            model_fingerprint=key.model_fingerprint,
            metadata=metadata,
            row_group_size=config.row_group_size,
        ) as writer,
        _progress(desc=job.tar.name, unit="sample", disable=not (progress and progress_enabled())) as bar,
        _model_threads(scorer, config),
    ):
        try:
            for window in _windows(items, config):
                rows = _score_window(window, runner, config)
                writer.write(rows)
                for row in rows:
                    counts.add(row.result)
                    written_keys.add(escape_unencodable(row.key)[0])
                bar.update(len(rows))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # an abandoned worker stream restarts its workers
        n_rows = writer.commit()
    wall_s = time.perf_counter() - start
    summary = TarScoreSummary(
        job.tar,
        job.table,
        job.manifest_path,
        job.pkey,
        False,
        n_rows,
        counts.by_status,
        counts.by_reason,
        wall_s,
        runner.model_s,
    )
    meta = {
        "source": job.source,
        "partition_key": job.pkey,
        "kind": str(job.kind),
        "table": {
            "path": job.table.name,
            "format": str(job.output_format),
            "rows": n_rows,
            "bytes": job.table.stat().st_size,
        },
        "counts": {"status": counts.by_status, "reason": counts.by_reason},
        "scored_by": job.scored_by or "local",
        "listing": listing_record(job.tar, written_keys, walk),
        "timings": {
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(wall_s, 3),
            "model_s": round(runner.model_s, 3),
            "samples_per_s": round(summary.samples_per_s, 2),
            "batches": runner.batches,
        },
        "runtime": {
            "dtype": scorer_dtype(scorer),
            "batch_size": config.batch_size,
            "num_workers": config.num_workers,
            "worker_restarts": getattr(pool, "restarts", 0),
        },
    }
    if job.output_format == OutputFormat.UNIFILTER:  # the catalog ingests these, not the table
        from unifilter_core.catalog.stats import stats_from_scores

        stats = stats_from_scores(job.pkey, job.source, str(job.table), counts.ok_scores, counts.by_status,
                                  counts.by_reason, key.model_fingerprint)  # fmt: skip
        meta["stats"] = stats.to_manifest()
    meta.update(job.extra)
    write_manifest(job.manifest_path, _build_manifest(job, meta))
    logger.info("%s", summary.describe())
    return summary


def failed_summary(
    out: Any, tar_path: str | os.PathLike[str], source: str, error: str, output_format: OutputFormat | str
) -> TarScoreSummary:
    """The summary of a tar that could not be scored into ``out`` (no table written): ``error`` says why."""
    table, manifest = output_paths(out, tar_path, output_format)
    try:
        pkey = make_partition_key(source, tar_path)
    except ValueError:
        pkey = ""
    tar = storage.absolute(tar_path)
    return TarScoreSummary(tar, table, manifest, pkey, resumed=False, rows=0, error=error)


def score_tars(
    tar_paths: Sequence[str | os.PathLike[str]],
    scorer: Any,
    out_dir: str | os.PathLike[str],
    *,
    kind: SampleKind | str,
    source: str,
    config: ScoringConfig | None = None,
    progress: bool = True,
    force: bool = False,
    output_format: OutputFormat | str = OutputFormat.UNIFILTER,
    request_keys: dict[str, str] | None = None,
    manifest_extra: dict[str, Any] | None = None,
) -> Iterable[TarScoreSummary]:
    """Score many tars into ``<out_dir>/<stem>.parquet``, sharing one set of decode workers.

    A generator: each summary is yielded as soon as its tar is done (the CLI prints them as they come).
    Workers start only when a tar actually needs scoring. A tar that cannot be scored (any exception: a bad
    tar, a reader bug) yields a summary with ``error`` set and no table, and the next tar is scored;
    :class:`OutputError` (disk full, read-only output) and ``KeyboardInterrupt`` stop the block.

    Args:
        tar_paths: the shards, in the order to score them.
        scorer: a loaded ``Scorer``.
        out_dir: the output folder (created when missing).
        kind, source, config, progress, force: as in :func:`score_tar`.
        output_format: as in :func:`score_tar`; ``original`` writes ``<out_dir>/<stem>_quality_score.parquet``.
        request_keys: by ``str(tar)``, the ``request_key`` of :func:`score_tar` for that tar.
        manifest_extra: as in :func:`score_tar`, for every tar.
    """
    output_format = OutputFormat(output_format)
    config = config or ScoringConfig()
    out = storage.location(out_dir)
    pool = DecodePool(scorer.processor, config) if config.num_workers > 0 else None
    try:
        for tar_path in tar_paths:
            table, _ = output_paths(out, tar_path, output_format)
            try:
                summary = score_tar(
                    tar_path,
                    scorer,
                    table,
                    kind=kind,
                    source=source,
                    config=config,
                    progress=progress,
                    force=force,
                    pool=pool,
                    output_format=output_format,
                    request_key=(request_keys or {}).get(str(tar_path)),
                    manifest_extra=manifest_extra,
                )
            except OutputError:
                raise  # the output folder cannot take files: every later tar would fail the same way
            except Exception as exc:  # one tar never stops the block: record it and go on
                logger.error("%s could not be scored: %s", base_name(tar_path), short_error(exc))
                logger.debug("traceback of %s", tar_path, exc_info=True)
                summary = failed_summary(out, tar_path, source, short_error(exc), output_format)
            yield summary
    finally:
        if pool is not None:
            pool.close()
