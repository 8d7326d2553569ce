"""Scoring engine: webdataset tars in, one atomic parquet score table (+ manifest) per tar out.

Public entry points: :func:`score_tar`, :func:`score_tars`, :class:`ScoringConfig`, :func:`discover_tars`,
:func:`select_block`; the table schema and manifest helpers live in :mod:`unifilter_core.scoring.table`.
"""

from unifilter_core.scoring.config import SampleKind, ScoringConfig, canonical_config
from unifilter_core.scoring.discovery import discover_tars, select_block
from unifilter_core.scoring.engine import TarScoreSummary, score_tar, score_tars
from unifilter_core.scoring.output import OutputError, check_output_writable
from unifilter_core.scoring.table import SCORE_TABLE_COLUMNS, SCORE_TABLE_SCHEMA, read_manifest, table_paths

__all__ = [
    "SCORE_TABLE_COLUMNS",
    "SCORE_TABLE_SCHEMA",
    "OutputError",
    "SampleKind",
    "ScoringConfig",
    "TarScoreSummary",
    "canonical_config",
    "check_output_writable",
    "discover_tars",
    "read_manifest",
    "score_tar",
    "score_tars",
    "select_block",
    "table_paths",
]
