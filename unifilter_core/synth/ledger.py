"""The generation ledger, the result store and the training-JSON writer of Claude generation.

Files under the output folder:

- ``ledger.jsonl``: append-only JSON Lines, one flat event per state change of a request (fsync'd per append).
  The catalog ingests it with DuckDB ``read_json``: field names are stable interface (:class:`LedgerEvent`).
- ``results.jsonl``: the four validated texts of every succeeded request, keyed by ``request_id``, so a rerun never
  pays for a request again.
- ``train.json`` / ``val.json`` + ``images/``: UniFilter training JSON rebuilt from the results (atomic writes).

A crash can leave a torn last line in a JSONL file; readers ignore it and the next writer cuts it off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from unifilter_core.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

STATUSES = ("submitted", "succeeded", "invalid", "failed", "expired", "budget_stopped")


@dataclass(frozen=True, slots=True)
class Pricing:
    """USD per million tokens for one model (standard, non-batch prices; 5-minute cache writes)."""

    input: float
    output: float
    cache_write: float
    cache_read: float

    def cost(self, usage: TokenUsage, *, discount: float = 1.0) -> float:
        """Cost of one response; ``discount`` is 0.5 for the Message Batches API."""
        total = (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * self.cache_write
            + usage.cache_read_input_tokens * self.cache_read
        )
        return total / 1e6 * discount


# Published list prices (USD / MTok). Check https://platform.claude.com/docs/en/about-claude/pricing before a
# large run and pass corrected prices through ClaudeConfig.prices: the budget cap is only as good as this table.
DEFAULT_PRICES: dict[str, Pricing] = {
    "claude-sonnet-5-5": Pricing(2.0, 10.0, 2.5, 0.2),
    "claude-sonnet-5": Pricing(2.0, 10.0, 2.5, 0.2),
    "claude-sonnet-4-6": Pricing(3.0, 15.0, 3.75, 0.3),
    "claude-sonnet-4-5": Pricing(3.0, 15.0, 3.75, 0.3),
    "claude-sonnet-4-5-20250929": Pricing(3.0, 15.0, 3.75, 0.3),
    "claude-haiku-4-5": Pricing(1.0, 5.0, 1.25, 0.1),
    "claude-haiku-4-5-20251001": Pricing(1.0, 5.0, 1.25, 0.1),
    "claude-opus-4-5": Pricing(5.0, 25.0, 6.25, 0.5),
    "claude-opus-4-6": Pricing(5.0, 25.0, 6.25, 0.5),
    "claude-opus-5": Pricing(5.0, 25.0, 6.25, 0.5),
}


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts of one API response (the ``usage`` object)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @classmethod
    def from_api(cls, usage: Any) -> TokenUsage:
        """From an SDK ``Usage`` (optional cache fields may be None)."""
        return cls(
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            cache_creation_input_tokens=int(getattr(usage, "cache_creation_input_tokens", 0) or 0),
            cache_read_input_tokens=int(getattr(usage, "cache_read_input_tokens", 0) or 0),
        )


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(slots=True)
class LedgerEvent:
    """One state change of one request (one line of ``ledger.jsonl``; flat, stable field names).

    ``attempts`` counts how many times the request has been sent to the API in total (all runs).
    Token and cost fields describe the API response this event records (zero when there was none), so the sum
    of ``cost_usd`` over all events is what the run was billed.
    """

    request_id: str
    kind: str
    model: str
    mode: str
    status: str
    batch_id: str | None = None
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    error_type: str | None = None
    detail: str | None = None
    n_images: int = 0
    prompt_version: str = ""
    timestamp: str = field(default_factory=utc_now)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"ledger status must be one of {STATUSES}, got {self.status!r}")

    def with_usage(self, usage: TokenUsage, cost_usd: float) -> LedgerEvent:
        return dataclasses.replace(self, **dataclasses.asdict(usage), cost_usd=cost_usd)


@dataclass(slots=True)
class LedgerTotals:
    """Sums over all events, and request counts by latest status."""

    events: int = 0
    requests: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


class JsonlFile:
    """An append-only JSON Lines file: one fsync'd write per record, torn last line tolerated."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab+") as fh:
                self._cut_torn_tail(fh)
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All complete records. A last line without its newline (a torn write) is ignored."""
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        if lines[-1]:
            logger.warning("%s: ignoring a torn last line (%d bytes)", self.path, len(lines[-1]))
        records = []
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{self.path} line {number} is not valid JSON ({exc}); the file is corrupt: "
                    "move it away to start over, or delete that line"
                ) from exc
        return records

    def _cut_torn_tail(self, fh: Any) -> None:
        """Cut a last line without its newline (a write torn by a crash) so the next record starts clean."""
        end = fh.seek(0, os.SEEK_END)
        if end == 0:
            return
        fh.seek(end - 1)
        if fh.read(1) == b"\n":
            return
        fh.seek(0)
        keep = fh.read().rfind(b"\n") + 1
        logger.warning("%s: cutting a torn last line (%d bytes)", self.path, end - keep)
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


class Ledger:
    """``ledger.jsonl``: the request state machine of a generation run, on disk."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = JsonlFile(path)

    @property
    def path(self) -> Path:
        return self._file.path

    def append(self, event: LedgerEvent) -> None:
        self._file.append(dataclasses.asdict(event))

    def events(self) -> list[LedgerEvent]:
        names = {f.name for f in dataclasses.fields(LedgerEvent)}
        return [LedgerEvent(**{k: v for k, v in r.items() if k in names}) for r in self._file.read()]

    def state(self) -> dict[str, LedgerEvent]:
        """The latest event of every request."""
        return {event.request_id: event for event in self.events()}

    def totals(self) -> LedgerTotals:
        events = self.events()
        totals = LedgerTotals(events=len(events))
        for event in events:
            totals.input_tokens += event.input_tokens
            totals.output_tokens += event.output_tokens
            totals.cache_creation_input_tokens += event.cache_creation_input_tokens
            totals.cache_read_input_tokens += event.cache_read_input_tokens
            totals.cost_usd += event.cost_usd
        latest = {e.request_id: e.status for e in events}
        totals.requests = len(latest)
        for status in latest.values():
            totals.by_status[status] = totals.by_status.get(status, 0) + 1
        return totals


class ResultStore:
    """``results.jsonl``: validated texts per request id (the first record of an id wins)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file = JsonlFile(path)

    def append(self, record: dict[str, Any]) -> None:
        if "request_id" not in record or "texts" not in record:
            raise ValueError("a result record needs request_id and texts")
        self._file.append(record)

    def load(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for record in self._file.read():
            out.setdefault(record["request_id"], record)
        return out


def is_validation(request_id: str, val_fraction: float) -> bool:
    """Stable split: the same request always lands in the same split, whatever else the run contains."""
    bucket = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < round(val_fraction * 10_000)


def training_records(result: dict[str, Any]) -> list[dict[str, Any]]:
    """UniFilter training records (one per level) from one result.

    Caption: ``{"image": "<file>", "text": "<image>\\n<caption>", "label": level}``; interleaved: ``{"image":
    ["<file>", ...], "text": "...<image>...", "label": level}``. Image paths are relative to ``images/``.
    """
    images = result["images"]
    records = []
    for level_str, text in sorted(result["texts"].items(), key=lambda kv: -int(kv[0])):
        level = int(level_str)
        record: dict[str, Any] = {"id": f"{result['request_id']}_l{level}"}
        if result["kind"] == "caption":
            record.update(image=images[0], text="<image>\n" + text)
        else:
            record.update(image=list(images), text=text)
        record.update(label=level, source="claude", model=result["model"], request_id=result["request_id"])
        records.append(record)
    return records


def write_training_json(
    out_dir: str | os.PathLike[str], results: Iterable[dict[str, Any]], val_fraction: float
) -> dict[str, int]:
    """Rewrite ``train.json`` and ``val.json`` (atomic) from results whose images are all under ``images/``.

    Returns:
        counts: ``{"train": n, "val": n, "results": n, "missing_images": n}`` (records, except the last two).
    """
    out = Path(out_dir)
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    used = missing = 0
    for result in sorted(results, key=lambda r: r["request_id"]):
        names = result.get("images") or []
        if not names or not all((out / "images" / n).exists() for n in names):
            missing += 1
            continue
        used += 1
        split = "val" if is_validation(result["request_id"], val_fraction) else "train"
        splits[split].extend(training_records(result))
    for split, records in splits.items():
        atomic_write_bytes(out / f"{split}.json", json.dumps(records, ensure_ascii=False, indent=1).encode())
    if missing:
        logger.warning("%d results skipped: their images are not under %s/images", missing, out)
    return {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "results": used,
        "missing_images": missing,
    }
