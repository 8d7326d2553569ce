"""The configuration, errors and SDK client of a Claude generation run (:mod:`unifilter_core.synth.claude`).

The API key is read from ``ANTHROPIC_API_KEY`` only, handed to the SDK and never logged or written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import anthropic

from unifilter_core.synth.ledger import DEFAULT_PRICES, Pricing

MODES = ("messages", "batches", "auto")
_SECRET_ENV = ("ANTHROPIC_API_KEY",)


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
    # the SDK's retries of one call (429 / 408 / 409 / 5xx / 529 / connection errors / timeouts), honouring
    # retry-after, else exponential backoff; batch creation is never retried (it could pay twice)
    max_retries: int = 6
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
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ValueError(f"budget_usd must be >= 0 or None, got {self.budget_usd}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def pricing(self) -> Pricing:
        return self.prices[self.model]


def make_client(config: ClaudeConfig) -> anthropic.Anthropic:
    """An SDK client from ``ANTHROPIC_API_KEY`` that retries transient failures ``config.max_retries`` times."""
    key = os.environ.get("ANTHROPIC_API_KEY", "").strip()
    if not key:
        raise MissingAPIKeyError(
            "ANTHROPIC_API_KEY is not set: export your Anthropic API key to generate with Claude, "
            "or use the world backend for the offline generator"
        )
    base_url = config.base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
    return anthropic.Anthropic(
        api_key=key, base_url=base_url, max_retries=config.max_retries, timeout=config.timeout_s
    )


def redact(text: str | None) -> str | None:
    """Remove any secret value from a message before it is written (defence in depth)."""
    if text is None:
        return None
    for name in _SECRET_ENV:
        secret = os.environ.get(name, "")
        if len(secret) >= 8:
            text = text.replace(secret, "[redacted]")
    return text[:500]
