"""Reading the Claude generator's ``synthetic/<kind>/ledger.jsonl`` (one JSON event per line, append-only)."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Columns of ``generation_ledger`` filled from an event, in insert order.
LEDGER_FIELDS: tuple[str, ...] = (
    "request_id",
    "kind",
    "model",
    "mode",
    "status",
    "batch_id",
    "attempts",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "cost_usd",
    "error",
    "error_detail",
    "n_images",
    "prompt_version",
    "timestamp",
    "n_events",
    "total_input_tokens",
    "total_output_tokens",
    "total_cost_usd",
)
#: Where a column's value may come from, in order of preference (the generator writes ``error_type``/``detail``).
_ALIASES: dict[str, tuple[str, ...]] = {
    "error": ("error", "error_type"),
    "error_detail": ("error_detail", "detail"),
}
_N_EVENT_FIELDS = LEDGER_FIELDS.index("n_events")  # fields read from one event; the rest sum over events
_TOTALS = {
    "total_input_tokens": "input_tokens",
    "total_output_tokens": "output_tokens",
    "total_cost_usd": "cost_usd",
}
_INT_FIELDS = {
    "attempts",
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "n_images",
}


@dataclass(slots=True)
class LedgerParse:
    """The latest event per request id (with per-request totals), and how many lines could not be used."""

    events: list[dict[str, Any]]
    n_lines: int
    n_bad: int


def _timestamp(value: Any) -> datetime | None:
    """ISO-8601 string or epoch seconds -> naive UTC datetime; None when absent or unreadable."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                return None
            dt = datetime.fromtimestamp(float(value), tz=timezone.utc)
        else:
            dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _INT_FIELDS:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    if name == "cost_usd":
        try:
            v = float(value)
        except (TypeError, ValueError):
            return None
        return v if math.isfinite(v) else None
    if name == "timestamp":
        return _timestamp(value)
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _pick(event: dict[str, Any], name: str) -> Any:
    for alias in _ALIASES.get(name, (name,)):
        if event.get(alias) is not None:
            return event[alias]
    return None


def parse_ledger(path: Path, kind: str | None = None) -> LedgerParse:
    """Parse a ledger file, keeping the last event of each ``request_id`` (file order is event order).

    Each event's tokens and cost describe the API response it records, so a request's bill is the sum over its
    events: ``n_events`` and the ``total_*`` fields carry those sums next to the latest event's fields.

    A last line without its newline is a torn write and is ignored (as the generator does). Other lines that
    are not JSON objects with a string ``request_id`` are counted in ``n_bad`` and skipped with a warning;
    they never stop ingestion.

    Args:
        path: the ``ledger.jsonl`` file.
        kind: the kind to record when an event has none (the ``synthetic/<kind>`` folder name).
    """
    latest: dict[str, dict[str, Any]] = {}
    n_bad = 0
    lines = Path(path).read_bytes().split(b"\n")
    if lines[-1].strip():
        # no trailing newline: a torn write, even if it parses (the generator cuts it off before appending)
        n_bad += 1
        logger.warning("%s: ignoring a torn last line (%d bytes)", path, len(lines[-1]))
    lines = lines[:-1]
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            event = json.loads(raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("request_id"), str):
            n_bad += 1
            logger.warning("%s:%d: not a ledger event, skipped", path, number)
            continue
        row = {name: _coerce(name, _pick(event, name)) for name in LEDGER_FIELDS[:_N_EVENT_FIELDS]}
        if row["kind"] is None:
            row["kind"] = kind
        prev = latest.get(row["request_id"])
        row["n_events"] = 1 + (prev["n_events"] if prev else 0)
        for total, part in _TOTALS.items():
            row[total] = (row[part] or 0) + (prev[total] if prev else 0)
        latest[row["request_id"]] = row
    return LedgerParse(events=list(latest.values()), n_lines=len(lines), n_bad=n_bad)


def ledger_upsert(path: Path, kind: str, now: datetime) -> tuple[str, list[list[Any]]]:
    """The statement and parameters that upsert the latest event per ``request_id`` of one ledger file into
    ``generation_ledger`` (torn lines skipped with a warning)."""
    parsed = parse_ledger(path, kind=kind)
    if parsed.n_bad:
        logger.warning("%s: %d unreadable line(s) skipped", path, parsed.n_bad)
    params = [[e[name] for name in LEDGER_FIELDS] + [str(path), now] for e in parsed.events]
    cols = ", ".join(LEDGER_FIELDS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in (*LEDGER_FIELDS[1:], "ledger_path", "ingested_at"))
    sql = (
        f"INSERT INTO generation_ledger ({cols}, ledger_path, ingested_at) "
        f"VALUES ({', '.join('?' * (len(LEDGER_FIELDS) + 2))}) "
        f"ON CONFLICT (request_id) DO UPDATE SET {updates}"
    )
    return sql, params
