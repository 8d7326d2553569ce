"""Where score tables go and what writes them: paths per output format, the writer, the manifest's listing."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from unifilter_core.data.listing import list_tar_samples
from unifilter_core.scoring.config import OutputFormat
from unifilter_core.scoring.original_format import OriginalTableWriter, original_table_paths
from unifilter_core.scoring.table import ScoreTableWriter, table_paths

logger = logging.getLogger("unifilter_core.scoring.engine")  # its messages belong to the engine's log


def head_labels(scorer: Any) -> int:
    """``num_labels`` of the scorer's head (1 = regression; 2+ = classification with ``quality_class``)."""
    config = getattr(getattr(scorer, "model", None), "config", None)
    return int(getattr(config, "num_labels", 1) or 1)


def open_writer(
    output_format: OutputFormat,
    table: Path,
    *,
    scorer: Any,
    source: str,
    partition_key: str,
    model_fingerprint: str,
    metadata: dict[str, str],
    row_group_size: int,
) -> Any:
    """The table writer of ``output_format`` (both kinds: ``write(rows)``, ``commit() -> rows``, a context)."""
    if output_format is OutputFormat.ORIGINAL:
        return OriginalTableWriter(
            table,
            multi_label=head_labels(scorer) >= 2,
            metadata={**metadata, "source": source, "model_fingerprint": model_fingerprint},
        )
    return ScoreTableWriter(
        table,
        source=source,
        partition_key=partition_key,
        model_fingerprint=model_fingerprint,
        metadata=metadata,
        row_group_size=row_group_size,
    )


def output_paths(
    out_dir: str | os.PathLike[str], tar_path: str | os.PathLike[str], output_format: OutputFormat | str
) -> tuple[Path, Path]:
    """``(table, manifest)`` of ``tar_path`` under ``out_dir`` in ``output_format``."""
    if OutputFormat(output_format) is OutputFormat.ORIGINAL:
        return original_table_paths(out_dir, tar_path)
    return table_paths(out_dir, tar_path)


MISSING_EXAMPLES = 5


def start_listing(tar: Path) -> Future:
    """Start the independent header walk of ``tar`` (:func:`list_tar_samples`) in a thread, so that it overlaps
    the scoring instead of following it; pass the future to :func:`listing_record`."""
    future: Future = Future()

    def walk() -> None:
        try:
            future.set_result(list_tar_samples(tar))
        except BaseException as exc:  # handed to the caller by future.result()
            future.set_exception(exc)

    threading.Thread(target=walk, name=f"listing-{tar.name}", daemon=True).start()
    return future


def listing_record(tar: Path, written_keys: set[str], walk: Future | None = None) -> dict[str, Any]:
    """The manifest's ``listing``: an independent header walk of the tar against the keys the table holds.

    Args:
        tar: the scored tar.
        written_keys: the (escaped) keys of the table's rows.
        walk: the walk :func:`start_listing` started (None: walk now).

    Returns:
        ``{"samples", "members", "missing_keys", "missing_examples" (at most 5, sorted), "error"}``;
        ``missing_keys`` counts sample keys of the tar with no row (must be 0).
    """
    listing = walk.result() if walk is not None else list_tar_samples(tar)
    missing = sorted(listing.keys - written_keys)
    if missing:
        logger.error(
            "%s: %d sample key(s) of the tar have no row in the score table (e.g. %s); please report this",
            tar.name,
            len(missing),
            ", ".join(repr(k) for k in missing[:MISSING_EXAMPLES]),
        )
    return {
        "samples": listing.samples,
        "members": listing.members,
        "missing_keys": len(missing),
        "missing_examples": missing[:MISSING_EXAMPLES],
        "error": listing.error,
    }
