"""The DuckDB catalog (``<data root>/unifilter.duckdb``): tar registry, lineage, per-tar score statistics,
chosen thresholds, the Claude generation ledger and a ``scores`` view over every score parquet.

Table and column names are public (design.md, docs/catalog.md). Safe for many writing processes at once: see
:mod:`unifilter_core.catalog._locking`.
"""

from __future__ import annotations

from unifilter_core.catalog._locking import CatalogBusyError
from unifilter_core.catalog.core import DEFAULT_KEEP_FRACTION, Catalog
from unifilter_core.catalog.records import TarRecord
from unifilter_core.catalog.schema import HIST_EDGES, SCHEMA_VERSION, SCORE_COLUMNS
from unifilter_core.catalog.stats import ScoreStats, compute_score_stats
from unifilter_core.catalog.thresholds import ThresholdRow, format_table, validate_selection

__all__ = [
    "DEFAULT_KEEP_FRACTION",
    "HIST_EDGES",
    "SCHEMA_VERSION",
    "SCORE_COLUMNS",
    "Catalog",
    "CatalogBusyError",
    "ScoreStats",
    "TarRecord",
    "ThresholdRow",
    "compute_score_stats",
    "format_table",
    "validate_selection",
]
