"""Catalog schema: table DDL, the schema version and the ``scores`` view.

Table and column names are public interface (design.md "Catalog"): users run their own SQL against them.
All timestamps are UTC ``TIMESTAMP`` values.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import duckdb

from unifilter_core import storage

logger = logging.getLogger(__name__)

#: Bump when the DDL changes; :func:`migrate` brings older catalogs up to date.
SCHEMA_VERSION = 3

#: Fixed histogram bins of ``score_stats.histogram``: 30 bins of width 0.1 over [0, 3] (the released head's
#: level range). Scores below 0 count in the first bin, scores at or above 3 in the last.
HIST_LO, HIST_HI, HIST_BINS = 0.0, 3.0, 30
HIST_EDGES: list[float] = [
    round(HIST_LO + i * (HIST_HI - HIST_LO) / HIST_BINS, 6) for i in range(HIST_BINS + 1)
]

#: Fine bins of ``score_stats.fine_bins`` / ``score_hist``: width 0.01 from -1 (bin 0 also holds lower scores;
#: bin FINE_BINS - 1, from 3.99, also holds higher ones). Thresholds from statistics are exact to one bin.
FINE_LO, FINE_WIDTH, FINE_BINS = -1.0, 0.01, 500

#: On a store the ``scores`` view lists every committed table; past this many tables a scoring run no longer
#: rebuilds it (a listing of the whole store per run): ``unifilter catalog refresh`` does
STORE_VIEW_UPKEEP_MAX_TABLES = 10_000

#: Columns of the ``scores`` view, with their types (the score table of shared_api, minus ``detail``).
SCORE_COLUMNS: dict[str, str] = {
    "key": "VARCHAR",
    "source": "VARCHAR",
    "partition_key": "VARCHAR",
    "uid": "VARCHAR",
    "url": "VARCHAR",
    "score": "FLOAT",
    "status": "VARCHAR",
    "reason": "VARCHAR",
    "n_images": "INTEGER",
    "n_tokens": "INTEGER",
    "truncated": "BOOLEAN",
    "model_fingerprint": "VARCHAR",
    "flags": "VARCHAR",
    "quality_class": "INTEGER",
    "expected_level": "FLOAT",
}

# lineage keeps the latest materialization per (asset, partition); lineage_history every one
_LINEAGE_COLUMNS = """
    asset_key VARCHAR NOT NULL,
    partition_key VARCHAR,
    run_id VARCHAR NOT NULL,
    code_version VARCHAR,
    model_fingerprint VARCHAR,
    input_fingerprint VARCHAR,
    row_count BIGINT,
    started_at TIMESTAMP,
    finished_at TIMESTAMP,
    status VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL
"""

_TABLES = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER NOT NULL,
    applied_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS tars (
    partition_key VARCHAR PRIMARY KEY,
    source VARCHAR NOT NULL,
    kind VARCHAR,
    path VARCHAR NOT NULL,
    size_bytes BIGINT,
    mtime TIMESTAMP,
    fingerprint VARCHAR,
    registered_at TIMESTAMP NOT NULL,
    updated_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS lineage ({lineage_columns});
CREATE TABLE IF NOT EXISTS lineage_history ({lineage_columns});
CREATE TABLE IF NOT EXISTS score_stats (
    partition_key VARCHAR PRIMARY KEY,
    source VARCHAR,
    score_path VARCHAR NOT NULL,
    n_rows BIGINT NOT NULL,
    n_ok BIGINT NOT NULL,
    n_skipped BIGINT NOT NULL,
    n_error BIGINT NOT NULL,
    mean DOUBLE,
    p05 DOUBLE,
    p25 DOUBLE,
    p50 DOUBLE,
    p75 DOUBLE,
    p95 DOUBLE,
    min DOUBLE,
    max DOUBLE,
    histogram BIGINT[] NOT NULL,
    hist_edges DOUBLE[] NOT NULL,
    reasons MAP(VARCHAR, BIGINT) NOT NULL,
    model_fingerprint VARCHAR,
    updated_at TIMESTAMP NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS thresholds_id_seq START 1;
CREATE TABLE IF NOT EXISTS thresholds (
    id BIGINT PRIMARY KEY DEFAULT nextval('thresholds_id_seq'),
    selection_id VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    mode VARCHAR NOT NULL CHECK (mode IN ('keep_fraction', 'absolute')),
    keep_fraction DOUBLE,
    threshold DOUBLE,
    kept BIGINT NOT NULL,
    total BIGINT NOT NULL,
    score_mean DOUBLE,
    score_min DOUBLE,
    score_max DOUBLE,
    scored_at TIMESTAMP NOT NULL,
    model_fingerprint VARCHAR
);
CREATE TABLE IF NOT EXISTS generation_ledger (
    request_id VARCHAR PRIMARY KEY,
    kind VARCHAR,
    model VARCHAR,
    mode VARCHAR,
    status VARCHAR,
    batch_id VARCHAR,
    attempts INTEGER,
    input_tokens BIGINT,
    output_tokens BIGINT,
    cache_creation_input_tokens BIGINT,
    cache_read_input_tokens BIGINT,
    cost_usd DOUBLE,
    error VARCHAR,
    error_detail VARCHAR,
    n_images INTEGER,
    prompt_version VARCHAR,
    timestamp TIMESTAMP,
    n_events INTEGER,
    total_input_tokens BIGINT,
    total_output_tokens BIGINT,
    total_cost_usd DOUBLE,
    ledger_path VARCHAR,
    ingested_at TIMESTAMP NOT NULL
);
ALTER TABLE thresholds ADD COLUMN IF NOT EXISTS method VARCHAR;
ALTER TABLE score_stats ADD COLUMN IF NOT EXISTS fine_bins INTEGER[];
ALTER TABLE score_stats ADD COLUMN IF NOT EXISTS fine_counts BIGINT[];
CREATE TABLE IF NOT EXISTS score_hist (
    source VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,
    bin INTEGER NOT NULL,
    n BIGINT NOT NULL,
    PRIMARY KEY (source, model_fingerprint, bin)
);
CREATE TABLE IF NOT EXISTS score_drift (
    partition_key VARCHAR PRIMARY KEY,
    source VARCHAR,
    reference VARCHAR NOT NULL,
    n BIGINT NOT NULL,
    n_reference BIGINT NOT NULL,
    psi DOUBLE,
    ks DOUBLE,
    ks_pvalue DOUBLE,
    error_share DOUBLE NOT NULL,
    flagged BOOLEAN NOT NULL,
    reason VARCHAR,
    model_fingerprint VARCHAR,
    computed_at TIMESTAMP NOT NULL
);
CREATE OR REPLACE VIEW sources AS
SELECT t.source,
       any_value(t.kind) AS kind,
       count(*) AS n_tars,
       sum(t.size_bytes) AS size_bytes,
       count(s.partition_key) AS n_scored,
       sum(s.n_rows) AS n_rows,
       sum(s.n_ok) AS n_ok,
       sum(s.n_skipped) AS n_skipped,
       sum(s.n_error) AS n_error
FROM tars t LEFT JOIN score_stats s USING (partition_key)
GROUP BY t.source;
"""


def scores_glob(tables: Any) -> str:
    """The glob of every score parquet: ``<tables>/scores/*/*.parquet`` (``tables``: the data root, or the
    store URL of :func:`unifilter_core.paths.tables_root`)."""
    return str(storage.join(tables, "scores") / "*" / "*.parquet")


def attach_store(conn: duckdb.DuckDBPyConnection, tables: Any) -> None:
    """Let ``conn`` read score tables on a store: DuckDB reads ``s3://...`` through the fsspec filesystem
    (registered on this connection only; no DuckDB extension is needed or downloaded). Nothing for a local
    root."""
    if storage.is_url(tables):
        fs = storage.location(tables).fs
        if not conn.filesystem_is_registered(fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]):
            conn.register_filesystem(fs)


def score_table_files(tables: Any) -> list[Any]:
    """The score tables under ``<tables>/scores/<source>/``, sorted.

    On local disk every ``*.parquet`` (tables appear by rename: present means complete). On a store only the
    committed ones: a table counts once its manifest (``<stem>.manifest.json``, written last) is listed beside
    it, so a run killed between the two uploads never shows a table (see :func:`unifilter_core.storage.publish`).
    """
    scores = storage.join(tables, "scores")
    if not storage.is_url(scores):
        return sorted(scores.glob("*/*.parquet"))
    storage.forget_listings(scores)
    if not scores.exists():
        return []
    entries = {str(p) for p in scores.glob("*/*")}
    committed = [
        p for p in entries if p.endswith(".parquet") and p.rsplit(".", 1)[0] + ".manifest.json" in entries
    ]
    return [storage.location(p) for p in sorted(committed)]


def sql_string_literal(value: str) -> str:
    """A single-quoted SQL string literal (quotes doubled). Only for DDL, where DuckDB takes no parameters."""
    if "\x00" in value:
        raise ValueError("a NUL byte cannot appear in a catalog path")
    return "'" + value.replace("'", "''") + "'"


@dataclass(slots=True)
class ScoreFiles:
    """The score parquet under a data root, split by whether their footer reads.

    Attributes:
        good: paths whose footer (schema) reads, sorted.
        bad: ``(path, why)`` of the files that are not readable parquet (truncated, garbage); they are left out
            of the ``scores`` view, the thresholds and ``score_stats`` with a warning.
        columns: the column names found in the good files.
    """

    good: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)


def scan_score_files(tables: Any) -> ScoreFiles:
    """Read the footer of every score table (:func:`score_table_files`; not its data): good files, bad ones,
    columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = ScoreFiles()
    for path in score_table_files(tables):
        try:
            with path.open("rb") as handle:
                names = pq.read_schema(handle).names
        except (OSError, pa.ArrowException) as exc:
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            logger.warning("score table %s is not readable parquet, left out: %s", path, why)
            found.bad.append((str(path), why))
            continue
        found.good.append(str(path))
        found.columns.update(names)
    return found


def create_scores_view(conn: duckdb.DuckDBPyConnection, root: Any) -> ScoreFiles:
    """(Re)create the ``scores`` view over the score parquet, or empty with the same columns.

    DuckDB views cannot hold bound parameters, so the source is a quoted literal built only from the data root:
    the glob when every file's footer reads, else the list of good files (a corrupt table is left out with a
    warning instead of failing every query). On a store the list of committed tables is always used (a glob
    would also match a table whose manifest is not written yet). A column no score file has yet reads as NULL,
    so the view always has :data:`SCORE_COLUMNS`. The view's comment records the columns read from files and
    the files left out, so updates can skip needless rebuilds.

    Returns:
        The scan the view was built from.
    """
    files = scan_score_files(root)
    present = files.columns
    cols = ", ".join(
        f"CAST({name if name in present else 'NULL'} AS {typ}) AS {name}"
        for name, typ in SCORE_COLUMNS.items()
    )
    if files.good and (files.bad or storage.is_url(root)):
        listed = ", ".join(sql_string_literal(p) for p in files.good)
        src = f"read_parquet([{listed}], union_by_name = true)"
        conn.execute(f"CREATE OR REPLACE VIEW scores AS SELECT {cols} FROM {src}")
    elif files.good:
        src = f"read_parquet({sql_string_literal(scores_glob(root))}, union_by_name = true)"
        conn.execute(f"CREATE OR REPLACE VIEW scores AS SELECT {cols} FROM {src}")
    else:
        conn.execute(f"CREATE OR REPLACE VIEW scores AS SELECT {cols} WHERE false")
    comment = {"columns": sorted(present & set(SCORE_COLUMNS)), "skipped": [p for p, _ in files.bad]}
    conn.execute(f"COMMENT ON VIEW scores IS {sql_string_literal(json.dumps(comment))}")
    return files


def _view_comment(conn: duckdb.DuckDBPyConnection) -> tuple[set[str], list[str]] | None:
    """``(columns read, files left out)`` of the current view, or None when unknown (old or missing view)."""
    row = conn.execute("SELECT comment FROM duckdb_views() WHERE view_name = 'scores'").fetchone()
    try:
        doc = json.loads(row[0]) if row and row[0] else None
    except (TypeError, ValueError):
        return None
    if isinstance(doc, list):  # catalogs written before files were checked: a list of columns
        return set(doc), []
    if isinstance(doc, dict) and isinstance(doc.get("columns"), list):
        return set(doc["columns"]), list(doc.get("skipped") or [])
    return None


def refresh_view_if_needed(conn: duckdb.DuckDBPyConnection, root: Any, new_parquet: str | None) -> None:
    """Keep the view in step cheaply: rebuild only when files appear/vanish, ``new_parquet`` brings columns
    the view does not read yet, or the view lists files one by one (some file was left out as unreadable).
    On a store the view is rebuilt up to :data:`STORE_VIEW_UPKEEP_MAX_TABLES` tables, then by refreshes only."""
    if storage.is_url(root):
        # the view lists the committed tables one by one: rebuild it, while that is cheap
        (tables,) = conn.execute("SELECT count(*) FROM score_stats").fetchone() or (0,)
        if tables <= STORE_VIEW_UPKEEP_MAX_TABLES:
            create_scores_view(conn, root)
        return
    known = _view_comment(conn)
    has_files = any((root / "scores").glob("*/*.parquet"))
    if known is not None and not known[1] and has_files == bool(known[0]):
        in_view = known[0]
        if new_parquet is None or not has_files:
            return
        cols = {r[0] for r in conn.execute("SELECT name FROM parquet_schema(?)", [new_parquet]).fetchall()}
        if (cols & set(SCORE_COLUMNS)) <= in_view:
            return
    create_scores_view(conn, root)


def apply_hist_delta(conn: duckdb.DuckDBPyConnection, replaced: str, added: str | None) -> None:
    """Keep ``score_hist`` equal to the sum of the ``score_stats`` fine bins: take away the bins of the rows whose
    partition keys the query ``replaced`` selects, add those of the relation ``added`` (same columns as
    ``score_stats``), inside the caller's transaction."""
    parts = [
        f"""SELECT coalesce(source, '') AS source, coalesce(model_fingerprint, '') AS fp,
                   unnest(fine_bins) AS bin, unnest(fine_counts) * -1 AS n
            FROM score_stats WHERE fine_bins IS NOT NULL AND partition_key IN ({replaced})"""
    ]
    if added:
        parts.append(
            f"""SELECT coalesce(source, '') AS source, coalesce(model_fingerprint, '') AS fp,
                       unnest(fine_bins) AS bin, unnest(fine_counts) AS n
                FROM {added} WHERE fine_bins IS NOT NULL"""
        )
    conn.execute(
        f"""INSERT INTO score_hist
            SELECT source, fp, bin, sum(n) FROM ({" UNION ALL ".join(parts)}) GROUP BY ALL HAVING sum(n) <> 0
            ON CONFLICT (source, model_fingerprint, bin) DO UPDATE SET n = n + excluded.n"""
    )
    conn.execute("DELETE FROM score_hist WHERE n = 0")


def current_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The catalog's schema version (0 when the catalog is empty)."""
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def utcnow() -> datetime:
    """Now, as a naive UTC datetime (the catalog's ``TIMESTAMP`` convention)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def migrate(conn: duckdb.DuckDBPyConnection, root: Any) -> int:
    """Create or upgrade the schema inside the caller's transaction; returns the version found before.

    Raises:
        RuntimeError: the catalog was written by a newer schema version than this code knows.
    """
    found = current_version(conn)
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"catalog schema version {found} is newer than this unifilter ({SCHEMA_VERSION}); upgrade unifilter"
        )
    if found < SCHEMA_VERSION:
        for statement in _TABLES.format(lineage_columns=_LINEAGE_COLUMNS).split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, ?)", [SCHEMA_VERSION, utcnow()])
        create_scores_view(conn, root)
    return found
