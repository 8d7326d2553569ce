"""The state one Claude run shares between its Messages and Batches senders: ledger, results, budget, stop flag.

Every state change of a request goes through :meth:`RunState.record` (one ledger event, fsync'd) and every paid
answer through :meth:`RunState.settle_output` (validated, stored before it is counted).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic

from unifilter_core.fileio import atomic_write_bytes
from unifilter_core.synth import prompts
from unifilter_core.synth.claude_config import ClaudeConfig, redact
from unifilter_core.synth.claude_plan import Budget, Planned
from unifilter_core.synth.claude_sources import SourceItem
from unifilter_core.synth.ledger import Ledger, LedgerEvent, ResultStore, TokenUsage
from unifilter_core.synth.prompts import ApiImage, ImageError, prepare_image

# errors that make every further request fail: the run stops instead of recording them request by request
FATAL_EXCEPTIONS = (anthropic.AuthenticationError, anthropic.PermissionDeniedError, anthropic.NotFoundError)
_STATUS_ERRORS = {429: "rate_limit_error", 529: "overloaded_error"}


def error_type_of(exc: BaseException) -> str:
    """A stable ledger error type for an SDK exception."""
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout_error"
    if isinstance(exc, anthropic.APIConnectionError):
        return "connection_error"
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        return str(err.get("type") or _STATUS_ERRORS.get(exc.status_code) or f"http_{exc.status_code}")
    return type(exc).__name__


class RunState:
    """One output folder's run: the SDK client, the ledger and results, the budget and why the run stopped."""

    def __init__(
        self,
        kind: str,
        out_dir: str | os.PathLike[str],
        config: ClaudeConfig,
        client: anthropic.Anthropic,
        poll_hook: Callable[[list[str], int], None] | None = None,
    ) -> None:
        self.kind, self.config, self.out_dir, self.client = kind, config, Path(out_dir), client
        self.poll_hook = poll_hook
        self.ledger = Ledger(self.out_dir / "ledger.jsonl")
        self.results = ResultStore(self.out_dir / "results.jsonl")
        self.state: dict[str, LedgerEvent] = {}
        self.had_invalid: set[str] = set()
        self.done: set[str] = set()
        self.stop: BaseException | None = None  # a fatal API error: no further request is sent
        self.budget = Budget(config.budget_usd, 0.0)
        self._lock = threading.Lock()

    def load(self) -> None:
        """Read the ledger's and the result store's state (at the start of a run)."""
        events = self.ledger.events()
        self.state = {e.request_id: e for e in events}
        self.had_invalid = {e.request_id for e in events if e.status == "invalid"}
        self.done = set(self.results.load())

    def reset_budget(self) -> None:
        """A fresh budget from the ledger's whole bill (nothing reserved)."""
        self.budget = Budget(self.config.budget_usd, sum(e.cost_usd for e in self.ledger.events()))

    def params(self, images: list[ApiImage], reask: str | None) -> dict[str, Any]:
        c = self.config
        return prompts.build_params(
            self.kind,
            images,
            model=c.model,
            max_tokens=c.max_tokens,
            force_tool=c.force_tool,
            thinking=c.thinking,
            reask=reask,
        )

    def prepare(self, p: Planned, mode: str) -> list[ApiImage] | None:
        """The request's images, ready to send; None (and a final ``failed`` record) when one cannot be read."""
        try:
            return [prepare_image(ref.read(), self.config.max_image_side) for ref in p.item.images]
        except (ImageError, OSError) as exc:
            self.record(p, "failed", mode=mode, error_type="image_decode_error", detail=str(exc))
            return None

    def record(
        self,
        base: LedgerEvent | Planned,
        status: str,
        *,
        mode: str | None = None,
        batch_id: str | None = None,
        attempts: int | None = None,
        usage: TokenUsage | None = None,
        cost: float = 0.0,
        error_type: str | None = None,
        detail: str | None = None,
        n_images: int | None = None,
    ) -> LedgerEvent:
        prev = base if isinstance(base, LedgerEvent) else self.state.get(base.request_id)
        event = LedgerEvent(
            request_id=base.request_id,
            kind=self.kind,
            model=self.config.model,
            mode=mode or (prev.mode if prev else "messages"),
            status=status,
            batch_id=batch_id,
            attempts=attempts if attempts is not None else (prev.attempts if prev else 0),
            error_type=error_type,
            detail=redact(detail),
            n_images=n_images if n_images is not None else (prev.n_images if prev else 0),
            prompt_version=prompts.PROMPT_VERSION,
        )
        if usage is not None:
            event = event.with_usage(usage, cost)
        with self._lock:
            self.ledger.append(event)
            self.state[event.request_id] = event
            if status == "invalid":
                self.had_invalid.add(event.request_id)
        return event

    def store_result(
        self, planned_id: str, item: SourceItem, texts: prompts.ValidatedTexts, usage: TokenUsage, cost: float
    ) -> None:
        names = []
        for ref in item.images:
            data = ref.read()
            name = ref.stored_name(data)
            target = self.out_dir / "images" / name
            if not target.exists():
                atomic_write_bytes(target, data)
            names.append(name)
        record = {
            "request_id": planned_id,
            "kind": self.kind,
            "model": self.config.model,
            "prompt_version": prompts.PROMPT_VERSION,
            "texts": {str(level): text for level, text in texts.texts.items()},
            "images": names,
            "source_refs": [ref.ref for ref in item.images],
            "usage": dataclasses.asdict(usage),
            "cost_usd": cost,
        }
        with self._lock:
            self.results.append(record)
            self.done.add(planned_id)

    def settle_output(
        self, p: Planned, message: Any, mode: str, batch_id: str | None, n_images: int, discount: float
    ) -> str | None:
        """Validate a paid response, store/record it. Returns a re-ask problem when one more try is due."""
        usage = TokenUsage.from_api(message.usage)
        cost = self.config.pricing.cost(usage, discount=discount)
        outcome = prompts.parse_response(self.kind, n_images, message)
        common = {"mode": mode, "batch_id": batch_id, "usage": usage, "cost": cost, "n_images": n_images}
        if isinstance(outcome, prompts.ValidatedTexts):
            self.store_result(p.request_id, p.item, outcome, usage, cost)
            self.record(p, "succeeded", **common)
            return None
        if p.request_id in self.had_invalid:
            self.record(p, "failed", error_type="invalid_output", detail=outcome, **common)
            return None
        self.record(p, "invalid", error_type="invalid_output", detail=outcome, **common)
        return outcome
