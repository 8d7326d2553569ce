"""Claude requests through the Message Batches API (half price): create, record, poll, collect.

Every request's ``submitted`` event with its batch id is on disk before the first poll, so a killed run resumes
by polling the recorded batches and never creates them again. Batch creation is sent once
(``max_retries=0``): after a lost response the batch may exist, and a second one would pay twice. Polls and result
downloads are reads and are retried by the SDK (``ClaudeConfig.max_retries``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import anthropic

from unifilter_core.synth.claude_plan import Planned, estimate_cost
from unifilter_core.synth.claude_sources import SourceItem
from unifilter_core.synth.claude_state import FATAL_EXCEPTIONS, RunState, error_type_of
from unifilter_core.synth.ledger import LedgerEvent

logger = logging.getLogger(__name__)

_Entry = tuple[Planned, dict[str, Any], float, int]  # request, its params, its reserved estimate, its images


def run_batch_round(run: RunState, plan: list[Planned]) -> list[Planned]:
    """Create batches for ``plan`` (ids recorded before any poll), wait for them; returns the re-asks."""
    discount = run.config.batch_discount
    entries: list[_Entry] = []
    for p in plan:
        images = run.prepare(p, "batches")
        if images is None:
            continue
        estimate = estimate_cost(run.kind, images, run.config, discount=discount)
        if not run.budget.reserve(estimate):
            run.record(p, "budget_stopped", mode="batches", n_images=len(images))
            continue
        entries.append((p, run.params(images, p.reask), estimate, len(images)))
    batch_ids = []
    step = run.config.batch_max_requests
    once = run.client.with_options(max_retries=0)  # a retried create could make (and pay for) a second batch
    for start in range(0, len(entries), step):
        chunk = entries[start : start + step]
        requests = [{"custom_id": p.request_id, "params": params} for p, params, _, _ in chunk]
        try:
            batch = once.messages.batches.create(requests=requests)
        except anthropic.APIError as exc:
            _create_failed(run, chunk, exc)
            continue
        for p, _, _, n in chunk:
            p.attempts += 1
            run.record(p, "submitted", mode="batches", batch_id=batch.id, attempts=p.attempts, n_images=n)
        batch_ids.append(batch.id)
        logger.info("created batch %s with %d request(s)", batch.id, len(chunk))
    del entries
    by_id = {p.request_id: p.item for p in plan}
    reasks = finish_batches(run, batch_ids, by_id)
    run.reset_budget()
    return reasks


def _create_failed(run: RunState, chunk: list[_Entry], exc: Exception) -> None:
    for _p, _, estimate, _ in chunk:
        run.budget.settle(estimate, 0.0)
    if isinstance(exc, FATAL_EXCEPTIONS):  # the run's fault, not the requests': no final record
        run.stop = exc
        return
    # after a connection error the batch may exist: count it as a send so resends stay bounded
    ambiguous = isinstance(exc, anthropic.APIConnectionError)
    etype, detail = error_type_of(exc), str(exc)
    for p, _, _, n in chunk:
        attempts = p.attempts + 1 if ambiguous else p.attempts
        run.record(
            p, "failed", mode="batches", attempts=attempts, error_type=etype, detail=detail, n_images=n
        )


def finish_batches(run: RunState, batch_ids: list[str], by_id: dict[str, SourceItem]) -> list[Planned]:
    """Poll until every batch has ended, then record its results. Returns the invalid outputs to re-ask."""
    pending, polls, started = list(batch_ids), 0, time.monotonic()
    reasks: list[Planned] = []
    while pending and run.stop is None:
        still = []
        for batch_id in pending:
            batch = run.client.messages.batches.retrieve(batch_id)
            if batch.processing_status == "ended":
                reasks.extend(_collect(run, batch_id, by_id))
            else:
                still.append(batch_id)
        pending = still
        if not pending:
            break
        polls += 1
        if run.poll_hook is not None:
            run.poll_hook(list(pending), polls)
        if run.config.max_wait_s is not None and time.monotonic() - started > run.config.max_wait_s:
            logger.warning("batches %s still in progress; rerun to resume them", pending)
            break
        time.sleep(run.config.poll_interval_s)
    return reasks


def _collect(run: RunState, batch_id: str, by_id: dict[str, SourceItem]) -> list[Planned]:
    """Record every result of an ended batch (idempotent: requests already recorded are skipped)."""
    reasks = []
    waiting = {rid for rid, e in run.state.items() if e.status == "submitted" and e.batch_id == batch_id}
    for line in run.client.messages.batches.results(batch_id):
        rid = line.custom_id
        if rid not in waiting:
            continue
        waiting.discard(rid)
        prev = run.state[rid]
        item = by_id.get(rid)
        p = Planned(rid, item if item is not None else SourceItem(ref="?", images=[]), prev.attempts)
        problem = _collect_one(run, p, prev, line.result, batch_id, item is not None)
        if problem is not None and item is not None:
            reasks.append(dataclasses.replace(p, reask=problem))
    for rid in waiting:
        run.record(run.state[rid], "expired", mode="batches", batch_id=batch_id, error_type="missing_result")
    return reasks


def _collect_one(
    run: RunState, p: Planned, prev: LedgerEvent, result: Any, batch_id: str, known: bool
) -> str | None:
    kind = result.type
    if kind == "succeeded":
        if not known:  # the item is not in this run's source: record on a later run that has it
            logger.warning(
                "result for %s has no source item in this run; rerun with its source", p.request_id
            )
            return None
        discount = run.config.batch_discount
        return run.settle_output(p, result.message, "batches", batch_id, prev.n_images, discount)
    if kind == "errored":
        err = getattr(getattr(result, "error", None), "error", None)
        etype = getattr(err, "type", None) or "api_error"
        run.record(prev, "failed", mode="batches", batch_id=batch_id, error_type=etype, detail=str(err))
    else:  # expired | canceled: not billed, sent again on the next run
        run.record(prev, "expired", mode="batches", batch_id=batch_id, error_type=kind)
    return None
