"""Claude requests through the Messages API: a bounded thread pool, one call per request.

Transient failures (429, 5xx, 529, connection errors, timeouts) are retried by the SDK itself
(``ClaudeConfig.max_retries``, honouring ``retry-after``); a request whose retries run out is recorded ``failed``
and sent again on a later run.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anthropic

from unifilter_core.synth.claude_plan import Planned, estimate_cost
from unifilter_core.synth.claude_state import FATAL_EXCEPTIONS, RunState, error_type_of


def run_messages(run: RunState, plan: list[Planned]) -> None:
    """Send every planned request (``concurrency`` at a time), re-asking an invalid answer once."""
    with ThreadPoolExecutor(max_workers=run.config.concurrency) as pool:
        list(pool.map(lambda p: _message_request(run, p), plan))


def _message_request(run: RunState, p: Planned) -> None:
    while run.stop is None:
        images = run.prepare(p, "messages")
        if images is None:
            return
        estimate = estimate_cost(run.kind, images, run.config)
        if not run.budget.reserve(estimate):
            run.record(p, "budget_stopped", mode="messages", n_images=len(images))
            return
        p.attempts += 1
        run.record(p, "submitted", mode="messages", attempts=p.attempts, n_images=len(images))
        params = run.params(images, p.reask)
        del images
        try:
            message = run.client.messages.create(**params)  # the SDK retries transient failures
        except anthropic.APIError as exc:
            run.budget.settle(estimate, 0.0)
            if isinstance(exc, FATAL_EXCEPTIONS):  # the run's fault, not the request's: no final record
                run.stop = exc
                return
            run.record(p, "failed", mode="messages", error_type=error_type_of(exc), detail=str(exc))
            return
        problem = run.settle_output(p, message, "messages", None, len(p.item.images), 1.0)
        run.budget.settle(estimate, run.state[p.request_id].cost_usd)
        if problem is None:
            return
        p.reask = problem
