"""Scoring tars on a Ray cluster: a pool of actors, each holding one resident model, scoring tar after tar.

The unit of work stays one tar and the writer stays :func:`~unifilter_core.scoring.engine.score_tar` (same
table, manifest, resume and commit rules); what changes is who runs it. The driver (the CLI, or a Dagster run)
starts ``workers`` actors, one per GPU (``num_gpus=1``) or, on a cluster without GPUs, one per
``cpus_per_worker`` CPUs. Each actor loads the checkpoint once and then scores whatever tar the driver hands it
next, so a block of thousands of tars costs one model load per actor, not one per tar.

Failures:

* a tar whose table is already complete is skipped by the actor that gets it (the engine's manifest check);
* a tar whose actor dies (its process or node killed, out of memory) is handed to a new actor and scored again
  (tables are idempotent: a table is committed only when whole); after ``max_attempts`` deaths on one tar it is
  reported failed, so a tar that kills every process it touches does not take the cluster down with it;
* an exception inside ``score_tar`` (an unreadable tar) is that tar's failed summary; the actor goes on.

Each manifest records ``scored_by``: ``{"executor": "ray", "node_id", "host", "pid"}``.

Paths: every node reads the tars and the checkpoint and writes the tables itself. With more than one node they
must be on a store (``s3://...``, :mod:`unifilter_core.storage`) or a shared file system; the driver warns when
the output folder is local and the cluster has several nodes.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from unifilter_core import storage
from unifilter_core.scoring.config import OutputFormat, SampleKind
from unifilter_core.scoring.engine import failed_summary
from unifilter_core.scoring.outputs import output_paths
from unifilter_core.scoring.summary import TarScoreSummary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to score on Ray.

    Attributes:
        address: the cluster (``auto``, ``<head ip>:6379`` or ``ray://<head>:10001``).
        workers: actors to start; None = one per GPU of the cluster, or (no GPU) its CPUs divided by
            ``cpus_per_worker``; never more than there are tars.
        cpus_per_worker: CPUs each actor reserves (its decode workers and torch threads use them).
        max_attempts: times a tar is handed out before its actor deaths make it a failed tar.
    """

    address: str
    workers: int | None = None
    cpus_per_worker: float = 1.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not self.address:
            raise ValueError("a Ray address is needed (auto, <head>:6379 or ray://<head>:10001)")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"ray workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus per Ray worker must be > 0, got {self.cpus_per_worker}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class RayTarget:
    """A cluster and the model its actors load: where a partition's tars go to be scored
    (:func:`unifilter_core.partition_groups.score_partition_tars`).

    Attributes:
        ray_settings: the cluster address and pool width.
        checkpoint: the classifier folder, as every node sees it.
        settings: unresolved scoring settings (each actor resolves them on its node).
    """

    ray_settings: RaySettings
    checkpoint: str
    settings: Any

    def score(
        self, tars: Sequence[Any], out_dir: Any, *, kind: str, source: str, request_keys: dict[str, str]
    ) -> Iterator[TarScoreSummary]:
        return score_tars_on_ray(tars, out_dir, checkpoint=self.checkpoint, settings=self.settings, kind=kind,
                                 source=source, ray_settings=self.ray_settings, request_keys=request_keys)  # fmt: skip


class TarScorer:
    """The body of a Ray actor: one loaded scorer, then :meth:`score` per tar (also usable without Ray).

    Args:
        checkpoint: the classifier folder (as every node sees it).
        settings: unresolved :class:`~unifilter_core.scoring.settings.ScoringSettings`; resolved here, on the
            actor's node (its GPU, its CPUs).
        kind, source, output_format: as in :func:`~unifilter_core.scoring.engine.score_tar`.
        cpus: CPUs reserved for this actor: decode workers (when not set) and torch threads follow it.
    """

    def __init__(
        self,
        checkpoint: str,
        settings: Any,
        kind: str,
        source: str,
        output_format: str,
        cpus: float,
    ) -> None:
        from unifilter_core.scorer import load_scorer

        slots = max(1, int(cpus))
        if settings.num_workers is None:
            settings = replace(settings, num_workers=slots - 1)
        self.settings = settings.resolve(kind)
        self.scorer = load_scorer(checkpoint, settings=self.settings)
        self.config = self.settings.scoring_config(
            torch_threads=slots if self.settings.device == "cpu" else None
        )
        self.kind, self.source, self.output_format = kind, source, output_format
        self.scored_by = {
            "executor": "ray",
            "node_id": _node_id(),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    def where(self) -> dict[str, Any]:
        """This actor's ``scored_by`` record."""
        return dict(self.scored_by)

    def score(self, tar: str, table: str, force: bool, request_key: str | None = None) -> TarScoreSummary:
        """Score one tar into ``table``; its summary (pickled back to the driver). ``scored_by`` also records
        ``model_loads``, the models this actor's process has loaded so far (1 for a resident model)."""
        from unifilter_core.scorer import models_loaded
        from unifilter_core.scoring.engine import score_tar

        return score_tar(
            tar,
            self.scorer,
            table,
            kind=self.kind,
            source=self.source,
            config=self.config,
            progress=False,
            force=force,
            output_format=self.output_format,
            request_key=request_key,
            scored_by={**self.scored_by, "model_loads": models_loaded()},
        )


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray: still usable as a plain object
        return None


def _connect(address: str) -> bool:
    """Connect this process to the cluster; returns True when it started the connection (and must end it)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'unifilter[ray]' (or ray>=2.40)") from None
    if ray.is_initialized():
        return False
    ray.init(address=address, namespace="unifilter", log_to_driver=False, configure_logging=False)
    return True


def _pool_size(ray_settings: RaySettings, n_tars: int) -> tuple[int, int]:
    """``(actors, gpus per actor)`` for the cluster as it is now."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if ray_settings.workers is not None:
        wanted = ray_settings.workers
    elif gpus:
        wanted = gpus
    else:
        wanted = max(1, int(resources.get("CPU", 1) // ray_settings.cpus_per_worker))
    return max(1, min(wanted, n_tars)), 1 if gpus else 0


def _warn_local_output(out: Any) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_url(out):
        logger.warning(
            "output %s is a local path and the cluster has %d nodes: each node writes its tables to its own "
            "disk unless the path is a shared file system (use an s3:// URL to collect them in one place)",
            out,
            len(nodes),
        )


def score_tars_on_ray(
    tar_paths: Sequence[Any],
    out_dir: Any,
    *,
    checkpoint: str,
    settings: Any,
    kind: SampleKind | str,
    source: str,
    ray_settings: RaySettings,
    force: bool = False,
    output_format: OutputFormat | str = OutputFormat.UNIFILTER,
    request_keys: dict[str, str] | None = None,
) -> Iterator[TarScoreSummary]:
    """Score ``tar_paths`` into ``out_dir`` on a Ray cluster; yields each tar's summary as it finishes.

    Args:
        tar_paths: the tars (local paths every node sees, or store URLs).
        out_dir: the output folder or store URL.
        checkpoint: the classifier folder (every node reads it).
        settings: unresolved scoring settings (each actor resolves them on its node).
        kind, source, force, output_format: as in :func:`~unifilter_core.scoring.engine.score_tars`.
        ray_settings: the cluster address and pool width.
        request_keys: by ``str(tar)``, the resume key (:func:`~unifilter_core.scoring.resume.request_key`)
            each table records, so the next identical request resumes without the model.

    Summaries come in completion order, not tar order. A tar that could not be scored has ``error`` set.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    kind = str(SampleKind(kind))
    fmt = str(OutputFormat(output_format))
    out = storage.location(out_dir)
    started = _connect(ray_settings.address)
    try:
        _warn_local_output(out)
        n_actors, gpus = _pool_size(ray_settings, len(tar_paths))
        actor_class = ray.remote(num_cpus=ray_settings.cpus_per_worker, num_gpus=gpus, max_restarts=0)(
            TarScorer
        )
        args = (str(checkpoint), settings, kind, source, fmt, ray_settings.cpus_per_worker)

        def new_actor() -> Any:
            return actor_class.remote(*args)

        actors: set[Any] = set()  # ready to take a tar (or busy with one)
        starting: dict[Any, Any] = {}  # readiness ref -> a replacement actor still being placed and loaded
        for _ in range(n_actors):
            actors.add(new_actor())
        logger.info(
            "scoring %d tar(s) on Ray %s with %d actor(s)", len(tar_paths), ray_settings.address, n_actors
        )
        pending: deque[Any] = deque(tar_paths)
        deaths: Counter[str] = Counter()
        inflight: dict[Any, tuple[Any, Any]] = {}

        idle: list[Any] = []  # live actors with nothing to do (a tar that comes back goes to them first)

        def hand_out(actor: Any) -> None:
            if not pending:
                idle.append(actor)
                return
            tar = pending.popleft()
            table, _ = output_paths(out, tar, fmt)
            rkey = (request_keys or {}).get(str(tar))
            inflight[actor.score.remote(str(tar), str(table), force, rkey)] = (actor, tar)

        try:
            for actor in actors:
                hand_out(actor)
            while inflight or (pending and starting):
                (ref,), _ = ray.wait([*inflight, *starting], num_returns=1)
                if ref in starting:  # a replacement is up: it takes the next tar
                    actor = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as exc:
                        _stop_if_init_failed(exc, checkpoint)
                        continue
                    actors.add(actor)
                    hand_out(actor)
                    continue
                actor, tar = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except RayTaskError as exc:  # score_tar raised inside a live actor: this tar's failure
                    yield failed_summary(out, tar, source, _first_line(exc), fmt)
                    hand_out(actor)
                    continue
                except RayActorError as exc:
                    _stop_if_init_failed(exc, checkpoint)
                    deaths[str(tar)] += 1
                    actors.discard(actor)
                    ray.kill(actor, no_restart=True)
                    if deaths[str(tar)] < ray_settings.max_attempts:
                        logger.warning(
                            "the actor scoring %s died (%s); scoring it again", tar, _first_line(exc)
                        )
                        pending.appendleft(tar)  # an idle actor takes it now, else the next one to finish
                        if idle:
                            hand_out(idle.pop())
                    else:
                        error = f"its Ray actor died {deaths[str(tar)]} times"
                        yield failed_summary(out, tar, source, error, fmt)
                    # a replacement takes work once placed and loaded (it may never be, when its node is gone)
                    replacement = new_actor()
                    starting[replacement.where.remote()] = replacement
                    continue
                yield result
                hand_out(actor)
            for tar in pending:  # every actor died and no replacement could start
                yield failed_summary(out, tar, source, "no Ray actor was left to score it", fmt)
        finally:
            for actor in [*actors, *starting.values()]:
                ray.kill(actor, no_restart=True)
    finally:
        if started:
            ray.shutdown()


def _stop_if_init_failed(exc: Any, checkpoint: str) -> None:
    """An actor whose model did not load: every actor would fail the same way, so the run stops here."""
    if exc.actor_init_failed:
        raise RuntimeError(f"a Ray worker could not load {checkpoint}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    shown = cause if isinstance(cause, BaseException) else exc
    text = str(shown).strip()
    return f"{type(shown).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
