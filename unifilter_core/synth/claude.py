"""Claude generation of (example, quality level) pairs through the Anthropic API.

One request per source image (``caption``) or image set (``interleaved``) asks Claude, through a forced tool call,
for a text at each of the four levels (:mod:`unifilter_core.synth.prompts`). Requests have a stable id derived
from their content, every state change is a ledger event (:mod:`unifilter_core.synth.ledger`) and results are
stored before they are counted, so a rerun never pays twice, an interrupted batch is resumed by its recorded id
and a budget cap stops spending. Small runs use the Messages API (bounded thread concurrency, retries with
backoff honouring ``retry-after``); bulk runs the Message Batches API at half the price.

The API key is read from ``ANTHROPIC_API_KEY`` only, handed to the SDK and never logged or written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
from filelock import FileLock, Timeout

from unifilter_core.fileio import atomic_write_bytes
from unifilter_core.synth import prompts
from unifilter_core.synth.claude_sources import (  # re-exported: the sources are part of this API
    SOURCE_TYPES,
    SourceItem,
    SourceSpec,
    load_items,
)
from unifilter_core.synth.ledger import (
    DEFAULT_PRICES,
    Ledger,
    LedgerEvent,
    Pricing,
    ResultStore,
    TokenUsage,
    write_training_json,
)
from unifilter_core.synth.pairs_folder import holds_world_pairs
from unifilter_core.synth.prompts import ApiImage, ImageError, prepare_image

logger = logging.getLogger(__name__)

__all__ = [
    "SOURCE_TYPES",
    "ClaudeConfig",
    "ClaudeGenerator",
    "ClaudeRunError",
    "MissingAPIKeyError",
    "SourceItem",
    "SourceSpec",
    "estimate_cost",
    "load_items",
    "make_client",
    "request_id_for",
    "run_claude_generation",
]

MODES = ("messages", "batches", "auto")
# error types after which a request may be sent again on a later run (transient); others are final
RETRYABLE_ERRORS = frozenset(
    {"rate_limit_error", "overloaded_error", "api_error", "connection_error", "timeout_error", "canceled"}
)
FINAL_ERRORS = frozenset({"invalid_output", "image_decode_error"})
# errors that make every further request fail: the run stops instead of recording them request by request
_FATAL_EXCEPTIONS = (anthropic.AuthenticationError, anthropic.PermissionDeniedError, anthropic.NotFoundError)
_STATUS_ERRORS = {429: "rate_limit_error", 529: "overloaded_error"}


class MissingAPIKeyError(ValueError):
    """``ANTHROPIC_API_KEY`` is not set."""


class ClaudeRunError(RuntimeError):
    """The run cannot go on (bad key, unknown model, output folder in use)."""


@dataclass
class ClaudeConfig:
    """Configuration of a Claude generation run (all of it data; the CLI and Dagster build it)."""

    model: str = "claude-sonnet-5"  # a model with forced tool use (see docs/claude.md for Sonnet 5.5)
    max_tokens: int = 2048  # per response; also the output size the budget estimate assumes
    concurrency: int = 4  # parallel Messages requests
    budget_usd: float | None = 5.0  # cap on the ledger's total cost for this output folder (None: no cap)
    mode: str = "auto"  # "messages" | "batches" | "auto" (batches above batch_threshold requests)
    batch_threshold: int = 100
    prices: dict[str, Pricing] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    batch_discount: float = 0.5  # Message Batches price factor
    poll_interval_s: float = 30.0
    max_wait_s: float | None = None  # stop polling after this long (batches stay resumable); None: wait
    timeout_s: float = 600.0  # per HTTP request
    max_retries: int = 6  # retries of one call on 429 / 5xx / 529 / connection errors / timeouts
    retry_base_s: float = 1.0  # exponential backoff base when the server sends no retry-after
    retry_max_s: float = 60.0  # cap on any single wait, retry-after included
    max_submissions: int = 2  # sends of one request across runs after expiry/transient failure
    thinking: dict[str, Any] | None = field(default_factory=lambda: {"type": "disabled"})
    force_tool: bool = True  # tool_choice names the tool; False: "auto" (models that refuse forced tools)
    base_url: str | None = None  # else ANTHROPIC_BASE_URL, else the SDK default
    images_per_document: int = 3  # image-set size when documents are built from loose images
    max_image_side: int = 1568  # larger images are downscaled (JPEG) before sending
    val_fraction: float = 0.05
    batch_max_requests: int = 10_000

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.model not in self.prices:
            raise ValueError(
                f"no price for model {self.model!r}: add it to ClaudeConfig.prices (USD per MTok) so the budget "
                f"cap can work; known: {sorted(self.prices)}"
            )
        for name in ("max_tokens", "concurrency", "batch_threshold", "max_submissions", "batch_max_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must be >= 0 or None, got {self.budget_usd}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def pricing(self) -> Pricing:
        return self.prices[self.model]


# ---- requests --------------------------------------------------------------------------------------------------
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


def make_client(config: ClaudeConfig) -> anthropic.Anthropic:
    """An SDK client from ``ANTHROPIC_API_KEY`` (retries are ours: the SDK's are off)."""
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    if not key:
        raise MissingAPIKeyError(
            "ANTHROPIC_API_KEY is not set: export your Anthropic API key to generate with Claude, "
            "or use --backend world for the offline generator"
        )
    base_url = config.base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
    return anthropic.Anthropic(api_key=key, base_url=base_url, max_retries=0, timeout=config.timeout_s)


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


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, anthropic.APIConnectionError):
        return True
    return isinstance(exc, anthropic.APIStatusError) and (
        exc.status_code in (408, 409, 429) or exc.status_code >= 500
    )


class _Budget:
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
        self.client = client if client is not None else make_client(config)
        self.poll_hook = poll_hook
        self.ledger = Ledger(self.out_dir / "ledger.jsonl")
        self.results = ResultStore(self.out_dir / "results.jsonl")
        self._lock = threading.Lock()
        self._state: dict[str, LedgerEvent] = {}
        self._had_invalid: set[str] = set()
        self._done: set[str] = set()
        self._stop: BaseException | None = None
        self._budget = _Budget(config.budget_usd, 0.0)

    # ---- run -------------------------------------------------------------------------------------------------
    def run(self, items: list[SourceItem]) -> dict[str, Any]:
        """Resume in-flight batches, send what is still needed, rewrite train/val JSON. Returns a summary."""
        if holds_world_pairs(self.out_dir):
            raise ClaudeRunError(
                f"{self.out_dir} holds pairs of the world generator: choose another output folder"
            )
        with _exclusive(self.out_dir):
            events = self.ledger.events()
            self._state = {e.request_id: e for e in events}
            self._had_invalid = {e.request_id for e in events if e.status == "invalid"}
            self._done = set(self.results.load())
            by_id = self._index(items)
            self._reconcile()
            self._budget = _Budget(self.config.budget_usd, sum(e.cost_usd for e in self.ledger.events()))
            plan = self._plan(by_id)
            in_flight = sorted(
                {e.batch_id for e in self._state.values() if e.status == "submitted" and e.batch_id}
            )
            if in_flight:
                logger.info("resuming %d in-flight batch(es)", len(in_flight))
                reasks = self._finish_batches(in_flight, by_id)
                self._send(reasks)
            self._send(plan)
            self._raise_if_stopped()
            counts = write_training_json(self.out_dir, self.results.load().values(), self.config.val_fraction)
        return self._summary(len(by_id), counts)

    def _index(self, items: list[SourceItem]) -> dict[str, SourceItem]:
        by_id: dict[str, SourceItem] = {}
        for item in items:
            rid = request_id_for(self.config.model, self.kind, item.image_hashes())
            by_id.setdefault(rid, item)
        return by_id

    def _reconcile(self) -> None:
        """A result stored but not recorded as succeeded (crash between the two writes): record it from the
        result's own usage, so nothing is sent again and the cost is counted."""
        for rid, result in self.results.load().items():
            prev = self._state.get(rid)
            if prev is not None and prev.status != "succeeded":
                usage = TokenUsage(**result.get("usage", {}))
                self._record(prev, "succeeded", usage=usage, cost=float(result.get("cost_usd", 0.0)))

    def _plan(self, by_id: dict[str, SourceItem]) -> list[Planned]:
        """Requests to send now: new ones, budget-stopped ones, re-asks, and failures that may be sent again.
        Requests in flight in a batch are resumed, never planned."""
        plan = []
        for rid, item in by_id.items():
            prev = self._state.get(rid)
            if rid in self._done or (prev is not None and prev.status == "succeeded"):
                continue
            if prev is None:
                plan.append(Planned(rid, item))
            elif prev.status == "budget_stopped" or (prev.status == "submitted" and not prev.batch_id):
                plan.append(Planned(rid, item, prev.attempts))
            elif prev.status == "invalid":
                plan.append(Planned(rid, item, prev.attempts, reask=prev.detail or "invalid output"))
            elif prev.status in ("expired", "failed") and self._may_resend(prev):
                plan.append(Planned(rid, item, prev.attempts))
        return plan

    def _may_resend(self, prev: LedgerEvent) -> bool:
        """Final: outputs rejected twice (paid) and undecodable images. Expired and transient failures: up to
        ``max_submissions`` sends. Other API refusals (not billed, e.g. a 400 from a config mistake): always."""
        if prev.error_type in FINAL_ERRORS:
            return False
        if prev.status == "expired" or prev.error_type in RETRYABLE_ERRORS:
            return prev.attempts < self.config.max_submissions
        return True

    def _send(self, plan: list[Planned]) -> None:
        if not plan or self._stop is not None:
            return
        mode = self.config.mode
        if mode == "auto":
            mode = "batches" if len(plan) > self.config.batch_threshold else "messages"
        logger.info("sending %d request(s) with the %s API (model %s)", len(plan), mode, self.config.model)
        if mode == "messages":
            self._run_messages(plan)
        else:
            while plan and self._stop is None:
                plan = self._run_batch_round(plan)

    def _params(self, images: list[ApiImage], reask: str | None) -> dict[str, Any]:
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

    # ---- ledger helpers ----------------------------------------------------------------------------------------
    def _record(
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
        prev = base if isinstance(base, LedgerEvent) else self._state.get(base.request_id)
        event = LedgerEvent(
            request_id=base.request_id,
            kind=self.kind,
            model=self.config.model,
            mode=mode or (prev.mode if prev else "messages"),
            status=status,
            batch_id=batch_id,
            attempts=attempts if attempts is not None else (prev.attempts if prev else 0),
            error_type=error_type,
            detail=_redact(detail),
            n_images=n_images if n_images is not None else (prev.n_images if prev else 0),
            prompt_version=prompts.PROMPT_VERSION,
        )
        if usage is not None:
            event = event.with_usage(usage, cost)
        with self._lock:
            self.ledger.append(event)
            self._state[event.request_id] = event
            if status == "invalid":
                self._had_invalid.add(event.request_id)
        return event

    def _store_result(
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
            self._done.add(planned_id)

    def _settle_output(
        self, p: Planned, message: Any, mode: str, batch_id: str | None, n_images: int, discount: float
    ) -> str | None:
        """Validate a paid response, store/record it. Returns a re-ask problem when one more try is due."""
        usage = TokenUsage.from_api(message.usage)
        cost = self.config.pricing.cost(usage, discount=discount)
        outcome = prompts.parse_response(self.kind, n_images, message)
        common = {"mode": mode, "batch_id": batch_id, "usage": usage, "cost": cost, "n_images": n_images}
        if isinstance(outcome, prompts.ValidatedTexts):
            self._store_result(p.request_id, p.item, outcome, usage, cost)
            self._record(p, "succeeded", **common)
            return None
        if p.request_id in self._had_invalid:
            self._record(p, "failed", error_type="invalid_output", detail=outcome, **common)
            return None
        self._record(p, "invalid", error_type="invalid_output", detail=outcome, **common)
        return outcome

    def _prepare(self, p: Planned, mode: str) -> list[ApiImage] | None:
        try:
            return [prepare_image(ref.read(), self.config.max_image_side) for ref in p.item.images]
        except (ImageError, OSError) as exc:
            self._record(p, "failed", mode=mode, error_type="image_decode_error", detail=str(exc))
            return None

    # ---- Messages API ------------------------------------------------------------------------------------------
    def _run_messages(self, plan: list[Planned]) -> None:
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            list(pool.map(self._message_request, plan))

    def _message_request(self, p: Planned) -> None:
        while self._stop is None:
            images = self._prepare(p, "messages")
            if images is None:
                return
            estimate = estimate_cost(self.kind, images, self.config)
            if not self._budget.reserve(estimate):
                self._record(p, "budget_stopped", mode="messages", n_images=len(images))
                return
            p.attempts += 1
            self._record(p, "submitted", mode="messages", attempts=p.attempts, n_images=len(images))
            params = self._params(images, p.reask)
            del images
            try:
                message = self._with_retries(lambda params=params: self.client.messages.create(**params))
            except anthropic.APIError as exc:
                self._budget.settle(estimate, 0.0)
                if isinstance(exc, _FATAL_EXCEPTIONS):  # the run's fault, not the request's: no final record
                    self._stop = exc
                    return
                self._record(p, "failed", mode="messages", error_type=error_type_of(exc), detail=str(exc))
                return
            n_images = len(p.item.images)
            problem = self._settle_output(p, message, "messages", None, n_images, 1.0)
            self._budget.settle(estimate, self._state[p.request_id].cost_usd)
            if problem is None:
                return
            p.reask = problem

    def _with_retries(self, call: Callable[[], Any], *, connection_retries: bool = True) -> Any:
        for attempt in range(self.config.max_retries + 1):
            try:
                return call()
            except anthropic.APIError as exc:
                retry = _is_retryable(exc)
                if isinstance(exc, anthropic.APIConnectionError) and not connection_retries:
                    retry = False
                if not retry or attempt == self.config.max_retries:
                    raise
                delay = self._retry_delay(exc, attempt)
                logger.warning("%s; retry %d in %.2fs", error_type_of(exc), attempt + 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _retry_delay(self, exc: anthropic.APIError, attempt: int) -> float:
        headers = exc.response.headers if isinstance(exc, anthropic.APIStatusError) else {}
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            try:
                seconds = float(headers.get(name)) * scale
            except (TypeError, ValueError):
                continue
            if seconds > 0:
                return min(seconds, self.config.retry_max_s)
        backoff = min(self.config.retry_base_s * 2**attempt, self.config.retry_max_s)
        return backoff * (0.5 + random.random() / 2)

    # ---- Message Batches API -----------------------------------------------------------------------------------
    def _run_batch_round(self, plan: list[Planned]) -> list[Planned]:
        """Create batches for ``plan`` (ids recorded before any poll), wait for them; returns the re-asks."""
        discount = self.config.batch_discount
        entries: list[tuple[Planned, dict[str, Any], float, int]] = []
        for p in plan:
            images = self._prepare(p, "batches")
            if images is None:
                continue
            estimate = estimate_cost(self.kind, images, self.config, discount=discount)
            if not self._budget.reserve(estimate):
                self._record(p, "budget_stopped", mode="batches", n_images=len(images))
                continue
            entries.append((p, self._params(images, p.reask), estimate, len(images)))
        batch_ids = []
        step = self.config.batch_max_requests
        for start in range(0, len(entries), step):
            chunk = entries[start : start + step]
            requests = [{"custom_id": p.request_id, "params": params} for p, params, _, _ in chunk]
            try:
                # no retry on a connection error: the batch may exist already and a second one would pay twice
                batch = self._with_retries(
                    lambda r=requests: self.client.messages.batches.create(requests=r),
                    connection_retries=False,
                )
            except anthropic.APIError as exc:
                self._batch_create_failed(chunk, exc)
                continue
            for p, _, _, n in chunk:
                p.attempts += 1
                self._record(
                    p, "submitted", mode="batches", batch_id=batch.id, attempts=p.attempts, n_images=n
                )
            batch_ids.append(batch.id)
            logger.info("created batch %s with %d request(s)", batch.id, len(chunk))
        del entries
        by_id = {p.request_id: p.item for p in plan}
        reasks = self._finish_batches(batch_ids, by_id)
        self._budget = _Budget(self.config.budget_usd, sum(e.cost_usd for e in self.ledger.events()))
        return reasks

    def _batch_create_failed(
        self, chunk: list[tuple[Planned, dict[str, Any], float, int]], exc: Exception
    ) -> None:
        for _p, _, estimate, _ in chunk:
            self._budget.settle(estimate, 0.0)
        if isinstance(exc, _FATAL_EXCEPTIONS):  # the run's fault, not the requests': no final record
            self._stop = exc
            return
        # after a connection error the batch may exist: count it as a send so resends stay bounded
        ambiguous = isinstance(exc, anthropic.APIConnectionError)
        for p, _, _, n in chunk:
            attempts = p.attempts + 1 if ambiguous else p.attempts
            etype, detail = error_type_of(exc), str(exc)
            self._record(
                p, "failed", mode="batches", attempts=attempts, error_type=etype, detail=detail, n_images=n
            )

    def _finish_batches(self, batch_ids: list[str], by_id: dict[str, SourceItem]) -> list[Planned]:
        """Poll until every batch has ended, then record its results. Returns the invalid outputs to re-ask."""
        pending, polls, started = list(batch_ids), 0, time.monotonic()
        reasks: list[Planned] = []
        while pending and self._stop is None:
            still = []
            for batch_id in pending:
                batch = self._with_retries(lambda b=batch_id: self.client.messages.batches.retrieve(b))
                if batch.processing_status == "ended":
                    reasks.extend(self._collect(batch_id, by_id))
                else:
                    still.append(batch_id)
            pending = still
            if not pending:
                break
            polls += 1
            if self.poll_hook is not None:
                self.poll_hook(list(pending), polls)
            if self.config.max_wait_s is not None and time.monotonic() - started > self.config.max_wait_s:
                logger.warning("batches %s still in progress; rerun to resume them", pending)
                break
            time.sleep(self.config.poll_interval_s)
        return reasks

    def _collect(self, batch_id: str, by_id: dict[str, SourceItem]) -> list[Planned]:
        """Record every result of an ended batch (idempotent: requests already recorded are skipped)."""
        reasks = []
        waiting = {
            rid for rid, e in self._state.items() if e.status == "submitted" and e.batch_id == batch_id
        }
        results = self._with_retries(lambda: self.client.messages.batches.results(batch_id))
        for line in results:
            rid = line.custom_id
            if rid not in waiting:
                continue
            waiting.discard(rid)
            prev = self._state[rid]
            item = by_id.get(rid)
            p = Planned(rid, item if item is not None else SourceItem(ref="?", images=[]), prev.attempts)
            problem = self._collect_one(p, prev, line.result, batch_id, item is not None)
            if problem is not None and item is not None:
                reasks.append(dataclasses.replace(p, reask=problem))
        for rid in waiting:
            self._record(
                self._state[rid], "expired", mode="batches", batch_id=batch_id, error_type="missing_result"
            )
        return reasks

    def _collect_one(
        self, p: Planned, prev: LedgerEvent, result: Any, batch_id: str, known: bool
    ) -> str | None:
        kind = result.type
        if kind == "succeeded":
            if not known:  # the item is not in this run's source: record on a later run that has it
                logger.warning(
                    "result for %s has no source item in this run; rerun with its source", p.request_id
                )
                return None
            discount = self.config.batch_discount
            return self._settle_output(p, result.message, "batches", batch_id, prev.n_images, discount)
        if kind == "errored":
            err = getattr(getattr(result, "error", None), "error", None)
            etype = getattr(err, "type", None) or "api_error"
            self._record(prev, "failed", mode="batches", batch_id=batch_id, error_type=etype, detail=str(err))
        else:  # expired | canceled: not billed, sent again on the next run
            self._record(prev, "expired", mode="batches", batch_id=batch_id, error_type=kind)
        return None

    # ---- summary -----------------------------------------------------------------------------------------------
    def _raise_if_stopped(self) -> None:
        if self._stop is not None:
            raise ClaudeRunError(f"the API refused the run ({error_type_of(self._stop)}): {self._stop}")

    def _summary(self, n_items: int, counts: dict[str, int]) -> dict[str, Any]:
        totals = self.ledger.totals()
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


_SECRET_ENV = ("ANTHROPIC_API_KEY",)


def _redact(text: str | None) -> str | None:
    """Remove any secret value from a message before it is written (defence in depth)."""
    if text is None:
        return None
    for name in _SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    return text[:500]


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
    """
    config = config or ClaudeConfig()
    generator = ClaudeGenerator(kind, out_dir, config, poll_hook=poll_hook)
    return generator.run(items)
