"""Typed Dagster resources: the data root and sources, the Claude client settings, the scoring model.

The DuckDB catalog is dagster-duckdb's ``DuckDBResource`` (its ``database`` is the catalog file); every write
goes through :class:`unifilter_core.catalog.Catalog`, which serialises writers across processes.
Secrets never pass through here: the Claude key is read from ``ANTHROPIC_API_KEY`` by the core client.
"""

import os
import threading
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource
from pydantic import Field, PrivateAttr

from unifilter_core import paths
from unifilter_core.partition_steps import DEFAULT_SOURCES, TarSource

ACTIVE_CLASSIFIER_FILE = "active_classifier.json"


class SourceConfig(dg.Config):
    """One input source: a folder of ``<NNNNNNNN>.tar`` shards."""

    name: str = Field(description="source name, the partition-key prefix (datacomp -> datacomp_0042)")
    kind: str = Field(description="caption (DataComp) or interleaved (OBELICS)")
    path: str | None = Field(
        default=None,
        description="folder of tars or a store URL (s3://bucket/shards); default <data root>/sources/<name>",
    )
    group_size: int = Field(
        default=1,
        description="tars per partition: 1 = one per tar (datacomp_0042); K = one per K tar ids "
        "(datacomp_0000-0255), scored with one model load. Set it past ~10k tars (Dagster advises <100k "
        "partitions per asset)",
    )


class WorldSettings(dg.Config):
    """Sizes of the embedded world (None = the generator's default, sized for a 2-core CPU demo)."""

    seed: int = 0
    train_images: int | None = None
    val_images: int | None = None
    train_documents: int | None = None
    val_documents: int | None = None
    pretrain_images: int | None = None
    caption_tars: int | None = None
    caption_tar_samples: int | None = None
    interleaved_tars: int | None = None
    interleaved_tar_docs: int | None = None

    def to_world_config(self) -> Any:
        from unifilter_core.synth import WorldConfig

        sizes = {k: v for k, v in self.model_dump().items() if v is not None}
        return WorldConfig(**sizes)


def default_root() -> str:
    return str(paths.data_root())


class UniFilterHome(dg.ConfigurableResource):
    """The data root, the input sources and whether inputs come from the embedded world."""

    root: str = Field(description="data root (UNIFILTER_HOME); every artefact lives under it")
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [
            SourceConfig(name=s.name, kind=s.kind, path=s.path, group_size=s.group_size)
            for s in DEFAULT_SOURCES
        ],
        description="input sources; the world writes datacomp (caption) and obelics (interleaved)",
    )
    use_world: bool = Field(
        default=True,
        description="inputs come from the embedded world (written when missing); False = real data only",
    )
    world: WorldSettings = Field(default_factory=WorldSettings)
    tables: str | None = Field(
        default=None,
        description="where scores/ and filtered/ live: a folder or a store URL (s3://bucket/unifilter); "
        "default $UNIFILTER_TABLES, else the data root. Credentials come from the AWS_* environment only",
    )

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve()

    @property
    def tables_location(self) -> Any:
        """The folder or store location (``upath.UPath``) of ``scores/`` and ``filtered/``."""
        return paths.tables_root(self.root_path, self.tables)

    def source_specs(self) -> list[TarSource]:
        return [TarSource(s.name, s.kind, s.path, s.group_size) for s in self.sources]

    def catalog(self, duckdb: DuckDBResource) -> Any:
        from unifilter_core.catalog import Catalog

        return Catalog(duckdb.database, root=self.root_path, tables=self.tables_location)


class ClaudeResource(dg.ConfigurableResource):
    """Which backend writes the synthetic pairs, and the Claude settings when it is Claude.

    The API key is never configuration: the client reads ``ANTHROPIC_API_KEY`` from the environment.
    """

    backend: str = Field(default="world", description="world (offline generator) or claude")
    model: str = "claude-sonnet-5"
    max_tokens: int = 2048
    concurrency: int = 4
    budget_usd: float = Field(default=5.0, description="stop sending when spent + estimate exceeds this")
    mode: str = Field(default="auto", description="auto | messages | batches")
    base_url: str | None = Field(
        default=None, description="API base URL (default: ANTHROPIC_BASE_URL or SDK)"
    )
    source_type: str = Field(
        default="world",
        description="images Claude writes about: the world's, an image folder, LLaVA, OBELICS",
    )
    source_path: str | None = None
    limit: int | None = Field(default=None, description="at most this many requests per kind")
    max_retries: int | None = Field(
        default=None, description="SDK retries of a transient API error (default: ClaudeConfig's)"
    )

    def claude_config(self) -> Any:
        """The core :class:`~unifilter_core.synth.claude.ClaudeConfig`: every field of it this resource sets."""
        import dataclasses

        from unifilter_core.synth.claude import ClaudeConfig

        given = {f.name: getattr(self, f.name, None) for f in dataclasses.fields(ClaudeConfig)}
        return ClaudeConfig(**{name: value for name, value in given.items() if value is not None})


class ScoringModelResource(dg.ConfigurableResource):
    """The classifier that scores tars, and how it runs.

    Its scoring fields are :class:`unifilter_core.scoring.settings.ScoringSettings` fields of the same name (see
    there for their meaning and defaults); :meth:`settings` builds and resolves them. The loaded model is held for
    the run (one load per run and checkpoint, released when the run ends), not in a process-wide cache.
    """

    checkpoint: str | None = Field(
        default=None,
        description="classifier folder (ours or the released layout); default: the active stage2_classifier",
    )
    vision_tower: str | None = Field(default=None, description="local SigLIP folder for released checkpoints")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: str = Field(default="auto", description="auto | float32 | bfloat16 | float16")
    batch_size: int | None = Field(
        default=None, description="samples per model call (default 16 captions, 4 documents)"
    )
    num_workers: int | None = Field(
        default=None, description="decode worker processes (default CPU cores - 1)"
    )
    max_batch_tokens: int | None = Field(default=None, description="padded-token budget per model call")
    image_aspect_ratio: str | None = Field(
        default=None, description="pad | resize (default: the checkpoint's)"
    )
    max_length: int | None = Field(
        default=None, description="longest spliced sequence (default: the checkpoint's)"
    )
    num_gpus: int = Field(default=0, description="GPUs on this machine for run tags (0 = score on CPU)")
    packing: str = Field(default="auto", description="off | on | auto: padding-free packed batches on GPU")
    compile_vision: str | None = Field(default=None, description="torch.compile mode for the tower (GPU)")
    vision_batch_size: int | None = Field(default=None, description="images per vision-tower call")
    executor: str = Field(
        default="local",
        description="local: score in the run's process; ray: hand the partition's tars to actors on the Ray "
        "cluster at ray_address (one resident model per actor). Ray's token comes from RAY_AUTH_TOKEN only",
    )
    ray_address: str | None = Field(default=None, description="auto, <head>:6379 or ray://<head>:10001")
    ray_workers: int | None = Field(default=None, description="actors (default one per GPU, else per CPU)")
    ray_cpus_per_worker: float = Field(default=1.0, description="CPUs each actor reserves")

    _loaded: dict[tuple[Any, ...], Any] = PrivateAttr(default_factory=dict)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self._loaded.clear()  # the run is over: its model goes with it

    def resolve_checkpoint(self, root: Path) -> Path:
        """The explicit checkpoint, else the one ``stage2_classifier`` made active."""
        import json

        if self.checkpoint:  # a folder, or the hub id of a model in the local Hugging Face cache
            from unifilter_core.hub_cache import resolve_reference

            return resolve_reference(self.checkpoint, what="checkpoint").resolve()
        pointer = paths.models_dir(root) / ACTIVE_CLASSIFIER_FILE
        if pointer.is_file():
            return Path(json.loads(pointer.read_text())["path"])
        default = paths.models_dir(root) / "stage2_classifier"
        if default.is_dir():
            return default
        raise ValueError(
            "no classifier yet: materialize `stage2_classifier` first, or set the scoring_model resource's "
            "`checkpoint` to a classifier folder (e.g. the released UniFilter-Qwen2.5-1.5B)"
        )

    def settings(self, kind: str, gpu_tag: str | None = None) -> Any:
        """The resolved :class:`~unifilter_core.scoring.settings.ScoringSettings` of a run scoring ``kind``
        (a run's GPU tag picks its GPU; without CUDA everything runs on the CPU)."""
        from unifilter_core.scoring.settings import ScoringSettings

        return ScoringSettings.from_values(self).resolve(kind, None if gpu_tag is None else int(gpu_tag))

    def request_key(self, root: Path, settings: Any, kind: str, tar: Path, config: Any) -> str:
        """The :func:`~unifilter_core.scoring.resume.request_key` of scoring ``tar`` with these settings."""
        from unifilter_core.scorer import resolve_checkpoint
        from unifilter_core.scoring.resume import request_key

        path = resolve_checkpoint(self.resolve_checkpoint(root))  # a clear error for a wrong folder
        extra = [settings.vision_tower] if settings.vision_tower else []
        return request_key(
            tar=tar,
            checkpoint=path,
            kind=kind,
            settings=settings.score_settings(),
            config=config,
            extra_dirs=extra,
        )

    def ray_target(self, root: Path) -> Any:
        """Where a run's tars are scored: None (in the run's process) or a
        :class:`~unifilter_core.scoring.ray_engine.RayTarget` on the cluster at ``ray_address``."""
        if self.executor not in ("local", "ray"):
            raise ValueError(f"scoring_model.executor must be 'local' or 'ray', got {self.executor!r}")
        if self.executor == "local":
            return None
        if not self.ray_address:
            raise ValueError("scoring_model.executor is 'ray': set ray_address (auto or <head>:6379)")
        from unifilter_core.scorer import resolve_checkpoint
        from unifilter_core.scoring.ray_engine import RaySettings, RayTarget
        from unifilter_core.scoring.settings import ScoringSettings

        ray = RaySettings(self.ray_address, self.ray_workers, self.ray_cpus_per_worker)
        checkpoint = resolve_checkpoint(self.resolve_checkpoint(root))
        return RayTarget(ray, str(checkpoint), ScoringSettings.from_values(self))

    def load(self, root: Path, settings: Any) -> Any:
        """A ``Scorer`` with ``settings``; the model is loaded once per run and checkpoint (other settings that
        do not change the weights reuse it)."""
        from unifilter_core.scorer import load_scorer, resolve_checkpoint

        path = resolve_checkpoint(self.resolve_checkpoint(root))
        key = (str(path), os.stat(path / "config.json").st_mtime_ns, settings.load_key())
        with self._lock:
            if key not in self._loaded:
                self._loaded.clear()
                self._loaded[key] = load_scorer(path, settings=settings)
            scorer = self._loaded[key]
        return scorer.with_settings(settings)


def default_resources(root: str | None = None, world: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resources of the platform, rooted at ``root`` (default: UNIFILTER_HOME or ./.unifilter).

    Args:
        root: the data root.
        world: :class:`WorldSettings` fields (sizes of the embedded world), e.g. for a quick demo or tests.
            Resources are built with them (``model_copy`` of a resource does not reach the run).
    """
    root = root or default_root()
    return {
        "home": UniFilterHome(root=root, world=WorldSettings(**(world or {}))),
        "claude": ClaudeResource(),
        "duckdb": DuckDBResource(database=str(paths.catalog_path(Path(root)))),
        "scoring_model": ScoringModelResource(),
    }
