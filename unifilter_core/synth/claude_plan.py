"""What a Claude run sends and what it may cost: request ids, the plan of a rerun, cost estimates, the budget.

Pure bookkeeping over the ledger's latest state (:mod:`unifilter_core.synth.ledger`); nothing here talks to the
API.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass

from unifilter_core.synth import prompts
from unifilter_core.synth.claude_config import ClaudeConfig
from unifilter_core.synth.claude_sources import SourceItem
from unifilter_core.synth.ledger import LedgerEvent
from unifilter_core.synth.prompts import ApiImage

# error types after which a request may be sent again on a later run (transient); others are final
RETRYABLE_ERRORS = frozenset(
    {"rate_limit_error", "overloaded_error", "api_error", "connection_error", "timeout_error", "canceled"}
)
FINAL_ERRORS = frozenset({"invalid_output", "image_decode_error"})


@dataclass(slots=True)
class Planned:
    """One request to send: its source item, id, how often it was sent before, and a re-ask note."""

    request_id: str
    item: SourceItem
    attempts: int = 0
    reask: str | None = None


def request_id_for(model: str, kind: str, image_hashes: list[str]) -> str:
    """Stable id of a request: model, prompt version, kind and the images' SHA-256 (custom_id-safe hex)."""
    key = json.dumps([model, prompts.PROMPT_VERSION, kind, image_hashes])
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def index_items(items: list[SourceItem], model: str, kind: str) -> dict[str, SourceItem]:
    """``{request id: item}`` in source order (items with the same images are one request)."""
    by_id: dict[str, SourceItem] = {}
    for item in items:
        by_id.setdefault(request_id_for(model, kind, item.image_hashes()), item)
    return by_id


def plan_requests(
    by_id: dict[str, SourceItem], state: dict[str, LedgerEvent], done: set[str], config: ClaudeConfig
) -> list[Planned]:
    """Requests to send now: new ones, budget-stopped ones, re-asks, and failures that may be sent again.
    Requests in flight in a batch are resumed, never planned."""
    plan = []
    for rid, item in by_id.items():
        prev = state.get(rid)
        if rid in done or (prev is not None and prev.status == "succeeded"):
            continue
        if prev is None:
            plan.append(Planned(rid, item))
        elif prev.status == "budget_stopped" or (prev.status == "submitted" and not prev.batch_id):
            plan.append(Planned(rid, item, prev.attempts))
        elif prev.status == "invalid":
            plan.append(Planned(rid, item, prev.attempts, reask=prev.detail or "invalid output"))
        elif prev.status in ("expired", "failed") and may_resend(prev, config.max_submissions):
            plan.append(Planned(rid, item, prev.attempts))
    return plan


def may_resend(prev: LedgerEvent, max_submissions: int) -> bool:
    """Final: outputs rejected twice (paid) and undecodable images. Expired and transient failures: up to
    ``max_submissions`` sends. Other API refusals (not billed, e.g. a 400 from a config mistake): always."""
    if prev.error_type in FINAL_ERRORS:
        return False
    if prev.status == "expired" or prev.error_type in RETRYABLE_ERRORS:
        return prev.attempts < max_submissions
    return True


def estimate_cost(kind: str, images: list[ApiImage], config: ClaudeConfig, *, discount: float = 1.0) -> float:
    """An upper-bound cost of one request: text at ~3 chars/token (priced as a cache write), images at
    width*height/750 tokens, and a full ``max_tokens`` of output."""
    p = config.pricing
    text_chars = len(prompts.SYSTEM_PROMPT) + len(json.dumps(prompts.tool_definition(kind))) + 600
    text_tokens = text_chars / 3
    image_tokens = sum(im.token_estimate for im in images)
    usd = (
        text_tokens * max(p.input, p.cache_write) + image_tokens * p.input + config.max_tokens * p.output
    ) / 1e6
    return usd * discount


class Budget:
    """Spent + reserved cost against the cap (thread-safe)."""

    def __init__(self, limit: float | None, spent: float) -> None:
        self.limit, self.spent, self.reserved = limit, spent, 0.0
        self._lock = threading.Lock()

    def reserve(self, estimate: float) -> bool:
        with self._lock:
            if self.limit is not None and self.spent + self.reserved + estimate > self.limit:
                return False
            self.reserved += estimate
            return True

    def settle(self, estimate: float, actual: float) -> None:
        with self._lock:
            self.reserved = max(0.0, self.reserved - estimate)
            self.spent += actual
