"""Small helpers shared by the assets: timing, lineage, metadata values."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import dagster as dg

CODE_VERSION = "1"

# what a user materializes to make a missing input (``MissingInput.needs``)
_MAKES = {"scores": "materialize `scores` for the partition(s) first",
          "thresholds": "materialize `quality_threshold` first"}  # fmt: skip


@contextmanager
def asset_advice() -> Iterator[None]:
    """Words a core step's :class:`~unifilter_core.partition_steps.MissingInput` with the asset that makes it."""
    from unifilter_core.partition_steps import MissingInput

    try:
        yield
    except MissingInput as exc:
        raise MissingInput(f"{exc}: {_MAKES.get(exc.needs, 'materialize ' + exc.needs)}", exc.needs) from None


@contextmanager
def timed() -> Iterator[dict[str, Any]]:
    """Yields a dict that holds ``started_at``, then ``finished_at`` and ``seconds`` once the block ends."""
    box: dict[str, Any] = {"started_at": datetime.now(timezone.utc)}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = round(time.perf_counter() - start, 3)
        box["finished_at"] = datetime.now(timezone.utc)


def record(
    catalog: Any,
    context: dg.AssetExecutionContext,
    timing: Mapping[str, Any],
    *,
    rows: int | None = None,
    model_fingerprint: str | None = None,
    input_fingerprint: str | None = None,
    status: str = "success",
) -> None:
    """One lineage row for this materialization (replacing the asset/partition's previous one)."""
    catalog.record_lineage(
        context.asset_key.to_user_string(),
        context.partition_key if context.has_partition_key else None,
        context.run_id,
        status=status,
        code_version=CODE_VERSION,
        model_fingerprint=model_fingerprint,
        input_fingerprint=input_fingerprint,
        row_count=rows,
        started_at=timing["started_at"],
        finished_at=timing["finished_at"],
    )


def md_table(rows: list[Mapping[str, Any]]) -> dg.MetadataValue:
    """A markdown table of dict rows (keys of the first row as columns)."""
    if not rows:
        return dg.MetadataValue.md("_(none)_")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return dg.MetadataValue.md("\n".join(lines))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def scalar_metadata(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keep the numbers, strings and bools of a dict (nested values become JSON metadata)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool | int | float | str) or value is None:
            out[key] = value if value is not None else "-"
        elif isinstance(value, Mapping | list):
            out[key] = dg.MetadataValue.json(value)  # type: ignore[arg-type]
    return out


def image_md(png: bytes, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a ``data:image/png`` URI)."""
    from unifilter_core.plots import png_markdown

    return dg.MetadataValue.md(png_markdown(png, alt))
