"""Synthetic pairs from either backend: one entry point, :func:`generate_pairs`, for the CLI and Dagster.

``world`` runs the offline procedural generator (:func:`unifilter_core.synth.world.write_synthetic_pairs`);
``claude`` loads the source items, moves the world's pairs out of the way when asked, and runs
:func:`unifilter_core.synth.claude.run_claude_generation`. Callers build the inputs and word the results and the
typed errors below; nothing here knows about flags or assets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unifilter_core.synth.claude_sources import SourceSpec
from unifilter_core.synth.pairs_folder import move_world_pairs_aside

if TYPE_CHECKING:
    from unifilter_core.synth.claude_config import ClaudeConfig
    from unifilter_core.synth.world_config import WorldConfig

BACKENDS = ("world", "claude")


class GenerationError(Exception):
    """Pairs could not be generated (see the subclasses)."""


class BackendUnavailableError(GenerationError):
    """The backend's code or dependency is not installed in this build."""

    def __init__(self, backend: str, cause: ImportError) -> None:
        super().__init__(f"the {backend} backend is not available in this build ({cause})")
        self.backend = backend


class SourceMismatchError(GenerationError, ValueError):
    """The world backend generates its own images: it takes no other source."""

    def __init__(self, source_type: str) -> None:
        super().__init__(f"the world backend generates its own images; source {source_type!r} needs claude")
        self.source_type = source_type


class ClaudeAPIError(GenerationError):
    """The Anthropic API failed after the SDK's retries; the folder is resumable (run again)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(f"Anthropic API error ({type(cause).__name__})")
        self.api_error = type(cause).__name__


@dataclass
class GenerationResult:
    """What a run wrote: ``summary`` is the backend's summary plus ``skipped_sources`` (claude: source entries
    skipped, by reason) and ``world_pairs_moved_to`` (when world pairs were moved aside)."""

    backend: str
    kind: str
    out_dir: Path
    summary: dict[str, Any]
    skipped_sources: dict[str, int] = field(default_factory=dict)
    world_pairs_moved_to: Path | None = None

    @property
    def ledger_path(self) -> Path | None:
        """The Claude run's ledger (None for world pairs)."""
        return self.out_dir / "ledger.jsonl" if self.backend == "claude" else None

    @property
    def records(self) -> int:
        return int(self.summary.get("train", 0)) + int(self.summary.get("val", 0))


def generate_pairs(
    backend: str,
    kind: str,
    out_dir: str | os.PathLike[str],
    *,
    source: SourceSpec | None = None,
    world_config: WorldConfig | None = None,
    claude_config: ClaudeConfig | None = None,
    limit: int | None = None,
    data_root: Path | None = None,
    move_world_pairs: bool = True,
) -> GenerationResult:
    """Write (or, for claude, resume writing) ``kind`` pairs into ``out_dir`` with ``backend``.

    Args:
        backend: ``world`` or ``claude``.
        kind: ``caption`` or ``interleaved``.
        source: where Claude's images come from (default: the world's); the world backend takes none but ``world``.
        world_config / claude_config: the backend's settings (defaults when None).
        limit: at most this many Claude requests.
        data_root: the data root the ``world`` source reads.
        move_world_pairs: claude only: move world pairs found in ``out_dir`` to ``<out_dir>.world`` first (the
            default folder); False refuses such a folder instead (:class:`~.claude_config.ClaudeRunError`).

    Raises:
        ValueError: an unknown backend, ``limit`` < 1, a bad config or source
            (:class:`~.claude_sources.MissingWorldImagesError` when the world's images are not written yet).
        SourceMismatchError, BackendUnavailableError, ClaudeAPIError: see each.
        PairsFolderConflict: the folder holds the other backend's pairs.
        MissingAPIKeyError, ClaudeRunError: from the Claude run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    out = Path(out_dir)
    if backend == "world":
        return _world(kind, out, source, world_config)
    return _claude(
        kind, out, source or SourceSpec("world"), claude_config, limit, data_root, move_world_pairs
    )


def _world(kind: str, out: Path, source: SourceSpec | None, config: WorldConfig | None) -> GenerationResult:
    if source is not None and source.type != "world":
        raise SourceMismatchError(source.type)
    try:
        from unifilter_core.synth import world
    except ImportError as exc:
        raise BackendUnavailableError("world", exc) from exc
    summary = world.write_synthetic_pairs(kind, out, config if config is not None else world.WorldConfig())
    return GenerationResult("world", kind, out, summary)


def _claude(
    kind: str,
    out: Path,
    source: SourceSpec,
    config: ClaudeConfig | None,
    limit: int | None,
    data_root: Path | None,
    move_world_pairs: bool,
) -> GenerationResult:
    try:
        import anthropic

        from unifilter_core.synth import claude
    except ImportError as exc:
        raise BackendUnavailableError("claude", exc) from exc
    config = config if config is not None else claude.ClaudeConfig()
    items, skipped = claude.load_items(
        kind, source, images_per_document=config.images_per_document, limit=limit, data_root=data_root
    )
    moved = move_world_pairs_aside(out) if move_world_pairs else None  # e.g. the demo's: kept in <out>.world
    try:
        summary = claude.run_claude_generation(kind, items, out, config)
    except anthropic.APIError as exc:
        raise ClaudeAPIError(exc) from exc
    summary["skipped_sources"] = skipped
    if moved is not None:
        summary["world_pairs_moved_to"] = str(moved)
    return GenerationResult("claude", kind, out, summary, skipped, moved)
