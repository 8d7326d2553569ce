"""Options of the scoring engine (a typed config: the CLI and Dagster build one, the engine reads it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from unifilter_core.records import SampleKind

# Bump when a change in the engine changes what lands in a score table: every table is then rescored.
SCORE_TABLE_VERSION = 1


class OutputFormat(str, Enum):
    """The form of the score tables: ours (``<stem>.parquet``, the catalog's) or the original scripts'.

    ``original`` writes ``<stem>_quality_score.parquet`` with the sample json fields and ``quality_score``
    (:mod:`unifilter_core.scoring.original_format`); those tables are for downstream tools, not the catalog.
    """

    UNIFILTER = "unifilter"
    ORIGINAL = "original"

    def __str__(self) -> str:
        return self.value


def _default_limits() -> Any:
    from unifilter_core.data import ReaderLimits

    return ReaderLimits()


@dataclass(frozen=True)
class ScoringConfig:
    """How the engine streams, batches and parallelises one tar.

    Only ``reader_limits`` (plus the scorer's processing options and dtype, read from the scorer) can change the
    scores; everything else is about speed and memory and is therefore left out of the manifest's config hash.

    Attributes:
        batch_size: most samples per model call.
        max_batch_tokens: most padded tokens per model call (``samples x longest n_tokens``); None = no budget.
            A sample longer than the budget is scored alone.
        bucket_window: samples are sorted by length within windows of ``bucket_window x batch_size`` samples
            before being cut into batches (less padding); rows are still written in tar order.
        max_window_bytes: a window is also closed once the pixel tensors it holds reach this many bytes, which
            bounds memory for documents with many images.
        num_workers: decode + preprocess worker processes (0 = in the calling process). Workers run one torch
            thread each and overlap with the model running in the calling process.
        worker_chunk: samples a worker handles and sends at a time (worker ``w`` takes chunks ``w, w + W, ...``).
        worker_prefetch_windows: how many windows' worth of samples the workers may prepare ahead of the model.
        start_method: multiprocessing start method for workers: ``auto`` (default) forks while CUDA is not
            initialised in this process (fast start, like torch's DataLoader) and spawns otherwise (forking a
            CUDA process is unsafe); or ``fork`` / ``forkserver`` / ``spawn`` explicitly.
        worker_timeout_s: how long the engine waits for a worker without output before checking it is alive.
        row_group_size: rows per parquet row group.
        torch_threads: intra-op threads of the model process while scoring on CPU; None = the CPU cores left
            after the decode workers (at least 1), so workers and model never oversubscribe the cores (OpenMP
            threads that share a core with a busy worker slow down several-fold). Ignored on GPU.
        reader_limits: :class:`unifilter_core.data.ReaderLimits` for decoding (pixel limits etc.); None = defaults.
    """

    batch_size: int = 16
    max_batch_tokens: int | None = None
    bucket_window: int = 8
    max_window_bytes: int = 512 * 2**20
    num_workers: int = 1
    worker_chunk: int = 8
    worker_prefetch_windows: float = 1.0
    start_method: str = "auto"
    worker_timeout_s: float = 5.0
    row_group_size: int = 8192
    torch_threads: int | None = None
    reader_limits: Any = field(default=None)

    def __post_init__(self) -> None:
        positive = ("batch_size", "bucket_window", "worker_chunk", "row_group_size", "max_window_bytes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_batch_tokens is not None and (
            not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 1
        ):
            raise ValueError(f"max_batch_tokens must be None or an int >= 1, got {self.max_batch_tokens!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(
                f"num_workers must be an int >= 0 (0 = no worker processes), got {self.num_workers!r}"
            )
        if self.start_method not in ("auto", "spawn", "forkserver", "fork"):
            raise ValueError(
                f"start_method must be auto, spawn, forkserver or fork, got {self.start_method!r}"
            )
        if self.torch_threads is not None and (
            not isinstance(self.torch_threads, int) or self.torch_threads < 1
        ):
            raise ValueError(
                f"torch_threads must be None (automatic) or an int >= 1, got {self.torch_threads!r}"
            )
        if self.worker_prefetch_windows <= 0 or self.worker_timeout_s <= 0:
            raise ValueError("worker_prefetch_windows and worker_timeout_s must be > 0")
        if self.reader_limits is None:
            object.__setattr__(self, "reader_limits", _default_limits())

    @property
    def window_size(self) -> int:
        """Samples per bucketing window."""
        return self.bucket_window * self.batch_size


def as_plain(obj: Any) -> Any:
    """``obj`` as JSON-ready values: dataclasses as dicts, enums as their values, other objects as ``str``."""
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def canonical_config(kind: SampleKind | str, config: ScoringConfig, scorer: Any) -> dict[str, Any]:
    """The part of the configuration that can change a score table (hashed into the manifest).

    Args:
        kind: ``caption`` or ``interleaved``.
        config: the engine options (only ``reader_limits`` is score-relevant).
        scorer: the loaded scorer; its processing options and dtype are recorded.

    Returns:
        A JSON-serialisable dict with sorted, stable content.
    """
    return {
        "table_version": SCORE_TABLE_VERSION,
        "kind": str(SampleKind(kind)),
        "dtype": scorer_dtype(scorer),
        # packed and padded batches agree to 1e-5 in fp32 but only to ~1e-3 in bf16
        "packing": bool(getattr(scorer, "uses_packing", False)),
        "processing": as_plain(scorer.processor.config),
        "reader_limits": as_plain(config.reader_limits),
    }


def scorer_dtype(scorer: Any) -> str:
    """The compute dtype of a scorer as a string (``float32``, ``bfloat16``, ...)."""
    options = getattr(scorer, "options", None)
    dtype = getattr(options, "dtype", None) or getattr(scorer, "dtype", None)
    if dtype is None:
        model = getattr(scorer, "model", None)
        dtype = next(model.parameters()).dtype if model is not None else "unknown"
    return str(dtype).removeprefix("torch.")
