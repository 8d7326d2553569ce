"""Row types the catalog takes in, and the conversion of time values to its UTC ``TIMESTAMP`` convention."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any


@dataclass(slots=True)
class TarRecord:
    """One registered input tar (one row of ``tars``)."""

    partition_key: str
    source: str
    path: str
    kind: str | None = None
    size_bytes: int | None = None
    mtime: datetime | float | None = None
    fingerprint: str | None = None


def as_timestamp(value: datetime | float | None) -> datetime | None:
    """Epoch seconds or datetime -> naive UTC datetime (the catalog's ``TIMESTAMP`` convention)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(float(value), tz=timezone.utc).replace(tzinfo=None)
    if value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def tar_record(row: TarRecord | Mapping[str, Any]) -> TarRecord:
    if isinstance(row, TarRecord):
        return row
    names = {f.name for f in fields(TarRecord)}
    unknown = set(row) - names
    if unknown:
        raise ValueError(f"unknown tar fields {sorted(unknown)}; expected some of {sorted(names)}")
    return TarRecord(**row)
