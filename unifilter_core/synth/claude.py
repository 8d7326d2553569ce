"""Claude generation of (example, quality level) pairs through the Anthropic API: the public entry points.

One request per source image (``caption``) or image set (``interleaved``) asks Claude, through a forced tool call,
for a text at each of the four levels (:mod:`unifilter_core.synth.prompts`). Requests have a stable id derived
from their content, every state change is a ledger event (:mod:`unifilter_core.synth.ledger`) and results are
stored before they are counted, so a rerun never pays twice, an interrupted batch is resumed by its recorded id
and a budget cap stops spending. Small runs use the Messages API (bounded thread concurrency; the SDK retries
transient failures, honouring ``retry-after``); bulk runs the Message Batches API at half the price.

The parts: :mod:`~unifilter_core.synth.claude_config` (config, errors, SDK client),
:mod:`~unifilter_core.synth.claude_sources` (source items), :mod:`~unifilter_core.synth.claude_plan` (request ids,
what a rerun sends, cost estimates, budget), :mod:`~unifilter_core.synth.claude_state` (ledger and results of a
run), :mod:`~unifilter_core.synth.claude_messages` and :mod:`~unifilter_core.synth.claude_batches` (the two APIs).

The API key is read from ``ANTHROPIC_API_KEY`` only, handed to the SDK and never logged or written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anthropic
from filelock import FileLock, Timeout

from unifilter_core.synth import prompts
from unifilter_core.synth.claude_batches import finish_batches, run_batch_round
from unifilter_core.synth.claude_config import (
    MODES,
    ClaudeConfig,
    ClaudeRunError,
    MissingAPIKeyError,
    make_client,
)
from unifilter_core.synth.claude_messages import run_messages
from unifilter_core.synth.claude_plan import (
    FINAL_ERRORS,
    RETRYABLE_ERRORS,
    Planned,
    estimate_cost,
    index_items,
    plan_requests,
    request_id_for,
)
from unifilter_core.synth.claude_sources import (  # re-exported: the sources are part of this API
    SOURCE_TYPES,
    MissingWorldImagesError,
    SourceItem,
    SourceSpec,
    load_items,
)
from unifilter_core.synth.claude_state import RunState, error_type_of
from unifilter_core.synth.ledger import TokenUsage, write_training_json
from unifilter_core.synth.pairs_folder import holds_world_pairs

logger = logging.getLogger(__name__)

__all__ = [
    "FINAL_ERRORS",
    "MODES",
    "RETRYABLE_ERRORS",
    "SOURCE_TYPES",
    "ClaudeConfig",
    "ClaudeGenerator",
    "ClaudeRunError",
    "MissingAPIKeyError",
    "MissingWorldImagesError",
    "SourceItem",
    "SourceSpec",
    "estimate_cost",
    "load_items",
    "make_client",
    "request_id_for",
    "run_claude_generation",
]


@contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``<out_dir>/.synth.lock`` for the block; fail at once (no waiting) when another run holds it.

    A fresh :class:`~filelock.FileLock` per run (not a per-path singleton), so a second run in the same process
    is refused like one in another process.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / ".synth.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout as exc:
        raise ClaudeRunError(f"another `unifilter synth` run is writing {out_dir}; wait for it") from exc
    try:
        yield
    finally:
        lock.release()


class ClaudeGenerator:
    """Runs (and resumes) one output folder's generation. See :func:`run_claude_generation`."""

    def __init__(
        self,
        kind: str,
        out_dir: str | os.PathLike[str],
        config: ClaudeConfig,
        *,
        client: anthropic.Anthropic | None = None,
        poll_hook: Callable[[list[str], int], None] | None = None,
    ) -> None:
        if kind not in prompts.KINDS:
            raise ValueError(f"kind must be one of {prompts.KINDS}, got {kind!r}")
        self.kind, self.config, self.out_dir = kind, config, Path(out_dir)
        client = client if client is not None else make_client(config)
        self.run_state = RunState(kind, self.out_dir, config, client, poll_hook)

    def run(self, items: list[SourceItem]) -> dict[str, Any]:
        """Resume in-flight batches, send what is still needed, rewrite train/val JSON. Returns a summary."""
        if holds_world_pairs(self.out_dir):
            raise ClaudeRunError(
                f"{self.out_dir} holds pairs of the world generator: choose another output folder"
            )
        run = self.run_state
        with _exclusive(self.out_dir):
            run.load()
            by_id = index_items(items, self.config.model, self.kind)
            self._reconcile()
            run.reset_budget()
            plan = plan_requests(by_id, run.state, run.done, self.config)
            in_flight = sorted(
                {e.batch_id for e in run.state.values() if e.status == "submitted" and e.batch_id}
            )
            if in_flight:
                logger.info("resuming %d in-flight batch(es)", len(in_flight))
                self._send(finish_batches(run, in_flight, by_id))
            self._send(plan)
            if run.stop is not None:
                raise ClaudeRunError(f"the API refused the run ({error_type_of(run.stop)}): {run.stop}")
            counts = write_training_json(self.out_dir, run.results.load().values(), self.config.val_fraction)
        return self._summary(len(by_id), counts)

    def _reconcile(self) -> None:
        """A result stored but not recorded as succeeded (crash between the two writes): record it from the
        result's own usage, so nothing is sent again and the cost is counted."""
        run = self.run_state
        for rid, result in run.results.load().items():
            prev = run.state.get(rid)
            if prev is not None and prev.status != "succeeded":
                usage = TokenUsage(**result.get("usage", {}))
                run.record(prev, "succeeded", usage=usage, cost=float(result.get("cost_usd", 0.0)))

    def _send(self, plan: list[Planned]) -> None:
        run = self.run_state
        if not plan or run.stop is not None:
            return
        mode = self.config.mode
        if mode == "auto":
            mode = "batches" if len(plan) > self.config.batch_threshold else "messages"
        logger.info("sending %d request(s) with the %s API (model %s)", len(plan), mode, self.config.model)
        if mode == "messages":
            run_messages(run, plan)
        else:
            while plan and run.stop is None:
                plan = run_batch_round(run, plan)

    def _summary(self, n_items: int, counts: dict[str, int]) -> dict[str, Any]:
        totals = self.run_state.ledger.totals()
        return {
            "backend": "claude",
            "kind": self.kind,
            "model": self.config.model,
            "out_dir": str(self.out_dir),
            "items": n_items,
            "requests_by_status": totals.by_status,
            "input_tokens": totals.input_tokens,
            "output_tokens": totals.output_tokens,
            "cache_creation_input_tokens": totals.cache_creation_input_tokens,
            "cache_read_input_tokens": totals.cache_read_input_tokens,
            "cost_usd": round(totals.cost_usd, 6),
            **counts,
        }


def run_claude_generation(
    kind: str,
    items: list[SourceItem],
    out_dir: str | os.PathLike[str],
    config: ClaudeConfig | None = None,
    *,
    poll_hook: Callable[[list[str], int], None] | None = None,
) -> dict[str, Any]:
    """Generate (or resume generating) Claude pairs for ``items`` into ``out_dir``.

    Writes ``ledger.jsonl``, ``results.jsonl``, ``images/``, ``train.json`` and ``val.json`` under ``out_dir``.

    Args:
        kind: ``caption`` (one image per item) or ``interleaved`` (an image set per item).
        items: source items (:func:`unifilter_core.synth.claude_sources.load_items`).
        out_dir: output folder; reruns on the same folder resume and never pay twice.
        config: model, budget, mode, retries...; defaults to :class:`ClaudeConfig`.
        poll_hook: called as ``hook(pending_batch_ids, polls)`` after each batch poll round (tests, progress).

    Returns:
        A summary: request counts by status, token totals, ``cost_usd`` (whole ledger), train/val record counts.

    Raises:
        MissingAPIKeyError: ``ANTHROPIC_API_KEY`` is not set.
        ClaudeRunError: the API refused the key or model, or the folder is in use by another run.
        anthropic.APIError: a batch poll or result download failed after the SDK's retries (rerun to resume).
    """
    config = config or ClaudeConfig()
    generator = ClaudeGenerator(kind, out_dir, config, poll_hook=poll_hook)
    return generator.run(items)
