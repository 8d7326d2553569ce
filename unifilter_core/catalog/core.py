"""The :class:`Catalog`: the DuckDB file ``<data root>/unifilter.duckdb`` and every operation on it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from unifilter_core.catalog import schema
from unifilter_core.catalog._locking import run_read, run_write
from unifilter_core.catalog.records import TarRecord, as_timestamp, tar_record
from unifilter_core.catalog.stats import ScoreStats, stats_arrow, table_stats
from unifilter_core.catalog.thresholds import (
    AUTO,
    EXACT,
    EXACT_MAX_TABLES,
    METHODS,
    STATS,
    ThresholdRow,
    query_thresholds,
    thresholds_from_stats,
    validate_selection,
)
from unifilter_core.paths import catalog_path, data_root, tables_root

logger = logging.getLogger(__name__)

DEFAULT_KEEP_FRACTION = 0.3
_GLOB_SPECIALS = set("*?[]{}")


class Catalog:
    """The DuckDB catalog: tar registry, lineage, score statistics, thresholds, generation ledger, scores view.

    Every write is one transaction on a short-lived connection under an exclusive lock on ``<db>.lock``, so
    several processes may call these methods at once; reads use read-only connections under a shared lock.

    Args:
        path: the DuckDB file; default ``<root>/unifilter.duckdb``.
        root: the data root; default the parent of ``path`` when ``path`` is given, else
            :func:`unifilter_core.paths.data_root`.
        tables: where ``scores/`` lives when not in the data root: a folder or a store URL
            (``s3://bucket/unifilter``); default :func:`unifilter_core.paths.tables_root` (``$UNIFILTER_TABLES``
            or the data root). Store tables are read through fsspec; the DuckDB file itself stays local.
        create: create the file and schema when missing; when False a missing catalog raises.
        lock_timeout: seconds to wait for another process's write before raising ``CatalogBusyError``.

    Raises:
        FileNotFoundError: ``create`` is False and the catalog does not exist.
        ValueError: the data root contains glob characters (``*?[]{}``) that would break the scores view.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        root: str | Path | None = None,
        tables: Any = None,
        create: bool = True,
        lock_timeout: float = 300.0,
    ) -> None:
        if root is not None:
            self.root = Path(root).expanduser().resolve()
        elif path is not None:
            self.root = Path(path).expanduser().resolve().parent
        else:
            self.root = data_root()
        self.path = Path(path).expanduser().resolve() if path is not None else catalog_path(self.root)
        self.tables = tables_root(self.root, tables)
        for what, where in (("data root", self.root), ("tables root", self.tables)):
            if _GLOB_SPECIALS & set(str(where)):
                raise ValueError(f"{what} {where} contains glob characters {''.join(sorted(_GLOB_SPECIALS))}")
        self.lock_timeout = float(lock_timeout)
        if not self.path.exists():
            if not create:
                raise FileNotFoundError(
                    f"no catalog at {self.path}; run `unifilter demo` or materialize tar_manifest first"
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.ensure_schema()
        elif create and self._read(schema.current_version) < schema.SCHEMA_VERSION:
            self.ensure_schema()

    def __repr__(self) -> str:
        return f"Catalog({str(self.path)!r}, root={str(self.root)!r}, tables={str(self.tables)!r})"

    # -- plumbing -------------------------------------------------------------------------------------------

    def _attach(self, conn: duckdb.DuckDBPyConnection) -> None:
        schema.attach_store(conn, self.tables)

    def _write(self, work: Any) -> Any:
        return run_write(self.path, work, timeout=self.lock_timeout, setup=self._attach)

    def _read(self, work: Any) -> Any:
        return run_read(self.path, work, timeout=self.lock_timeout, setup=self._attach)

    def connect_parquet(self) -> duckdb.DuckDBPyConnection:
        """An in-memory DuckDB connection that can read the score tables (store included); the caller closes it."""
        conn = duckdb.connect(":memory:")
        self._attach(conn)
        return conn

    @property
    def scores_glob(self) -> str:
        """``<tables>/scores/*/*.parquet``: every score table."""
        return schema.scores_glob(self.tables)

    def ensure_schema(self) -> int:
        """Create or upgrade the schema (idempotent); returns the version found before."""
        return self._write(lambda conn: schema.migrate(conn, self.tables))

    def refresh_scores_view(self) -> schema.ScoreFiles:
        """Rebuild the ``scores`` view from the score parquet present now (empty view when there is none).

        Returns:
            The files read, with those left out of the view because their footer does not read (warned).
        """
        return self._write(lambda conn: schema.create_scores_view(conn, self.tables))

    def score_files(self) -> schema.ScoreFiles:
        """The score tables, split into readable and unreadable ones (footers only); on a store only the
        committed ones (manifest present)."""
        return schema.scan_score_files(self.tables)

    # -- tar registry ---------------------------------------------------------------------------------------

    def register_tars(self, rows: Iterable[TarRecord | Mapping[str, Any]]) -> int:
        """Insert or update tars by ``partition_key`` (idempotent; ``registered_at`` keeps its first value).

        Returns:
            The number of rows given.
        """
        records = [tar_record(r) for r in rows]
        now = schema.utcnow()
        params = [
            [
                r.partition_key,
                r.source,
                r.kind,
                str(r.path),
                r.size_bytes,
                as_timestamp(r.mtime),
                r.fingerprint,
                now,
                now,
            ]
            for r in records
        ]
        if not params:
            return 0

        columns = ("partition_key", "source", "kind", "path", "size_bytes", "mtime", "fingerprint",
                   "registered_at", "updated_at")  # fmt: skip
        # one set-based INSERT (a row-at-a-time executemany costs ~5 ms a row: 48 s for 10k tars)
        table = pa.table({c: [row[i] for row in params] for i, c in enumerate(columns)})

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            conn.register("_new_tars", table)
            try:
                conn.execute(
                    """INSERT INTO tars SELECT * FROM _new_tars
                    ON CONFLICT (partition_key) DO UPDATE SET source = excluded.source, kind = excluded.kind,
                        path = excluded.path, size_bytes = excluded.size_bytes, mtime = excluded.mtime,
                        fingerprint = excluded.fingerprint, updated_at = excluded.updated_at"""
                )
            finally:
                conn.unregister("_new_tars")

        self._write(work)
        return len(params)

    def tars(self, source: str | None = None) -> list[TarRecord]:
        """Registered tars (optionally of one source), by partition key."""
        sql = (
            "SELECT partition_key, source, path, kind, size_bytes, mtime, fingerprint FROM tars "
            "WHERE ? IS NULL OR source = ? ORDER BY partition_key"
        )
        rows = self._read(lambda conn: conn.execute(sql, [source, source]).fetchall())
        return [TarRecord(*r) for r in rows]

    def tar_keys(self) -> set[str]:
        """The partition keys of every registered tar (one column: cheap at a million tars)."""
        rows = self._read(lambda conn: conn.execute("SELECT partition_key FROM tars").fetchall())
        return {r[0] for r in rows}

    # -- lineage --------------------------------------------------------------------------------------------

    def record_lineage(
        self,
        asset_key: str,
        partition_key: str | None,
        run_id: str,
        *,
        status: str,
        code_version: str | None = None,
        model_fingerprint: str | None = None,
        input_fingerprint: str | None = None,
        row_count: int | None = None,
        started_at: datetime | float | None = None,
        finished_at: datetime | float | None = None,
    ) -> None:
        """Record one materialization: replaces the latest row of (asset, partition), appends to history.

        Recording the same (run_id, asset_key, partition_key) twice keeps one history row (the later one).
        """
        if not asset_key or not run_id or not status:
            raise ValueError("record_lineage needs a non-empty asset_key, run_id and status")
        values = [
            asset_key,
            partition_key,
            run_id,
            code_version,
            model_fingerprint,
            input_fingerprint,
            row_count,
            as_timestamp(started_at),
            as_timestamp(finished_at),
            status,
            schema.utcnow(),
        ]

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            conn.execute(
                "DELETE FROM lineage WHERE asset_key = ? AND partition_key IS NOT DISTINCT FROM ?",
                [asset_key, partition_key],
            )
            conn.execute("INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
            conn.execute(
                "DELETE FROM lineage_history WHERE run_id = ? AND asset_key = ? "
                "AND partition_key IS NOT DISTINCT FROM ?",
                [run_id, asset_key, partition_key],
            )
            conn.execute("INSERT INTO lineage_history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)

        self._write(work)

    # -- score statistics -----------------------------------------------------------------------------------

    def record_score_stats(
        self, partition_key: str, parquet_path: str | Path, *, update_view: bool = True
    ) -> ScoreStats:
        """Record one score table's statistics in ``score_stats`` (replacing the partition's row) and keep the
        ``scores`` view current (unless ``update_view`` is False: the caller rebuilds it once after many)."""
        return self.record_score_stats_many([(partition_key, parquet_path)], update_view=update_view)[0]

    def record_score_stats_many(
        self, tables: Sequence[tuple[str, str | Path]], *, update_view: bool = True
    ) -> list[ScoreStats]:
        """:meth:`record_score_stats` for many ``(partition_key, parquet_path)`` pairs in one write (a tar
        group's tables). The statistics the engine recorded in each table's manifest are used; a table without
        them (written before they were recorded) is summarised from its parquet."""
        stats = [table_stats(path, key) for key, path in tables]  # a key is given: never None
        self.ingest_stats(stats, update_view=update_view)
        return stats

    def ingest_stats(self, stats: Sequence[ScoreStats], *, update_view: bool = False) -> int:
        """Write statistics in one transaction: each partition's ``score_stats`` row is replaced and the
        per-source fine histogram ``score_hist`` gets the difference (so it always sums the current rows)."""
        if not stats:
            return 0
        table = stats_arrow(stats, schema.utcnow())

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            conn.register("_new_stats", table)
            try:
                schema.apply_hist_delta(conn, "SELECT partition_key FROM _new_stats", "_new_stats")
                conn.execute(
                    "DELETE FROM score_stats WHERE partition_key IN (SELECT partition_key FROM _new_stats)"
                )
                conn.execute("INSERT INTO score_stats BY NAME SELECT * FROM _new_stats")
            finally:
                conn.unregister("_new_stats")
            if update_view:
                schema.refresh_view_if_needed(conn, self.tables, stats[-1].score_path)

        self._write(work)
        return len(stats)

    def score_stats(self, partition_key: str) -> dict[str, Any] | None:
        """The ``score_stats`` row of a partition as a dict, or None."""

        def work(conn: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
            cur = conn.execute("SELECT * FROM score_stats WHERE partition_key = ?", [partition_key])
            row = cur.fetchone()
            return dict(zip([c[0] for c in cur.description], row, strict=True)) if row else None

        return self._read(work)

    def delete_partition(self, partition_key: str, *, keep_registry: bool = False) -> None:
        """Remove a partition's ``score_stats`` and latest ``lineage`` rows, and its ``tars`` row unless
        ``keep_registry``. ``lineage_history`` is an audit log and keeps its rows."""

        def work(conn: duckdb.DuckDBPyConnection) -> None:
            conn.execute("CREATE OR REPLACE TEMP TABLE _gone AS SELECT ? AS partition_key", [partition_key])
            schema.apply_hist_delta(conn, "SELECT partition_key FROM _gone", None)
            conn.execute("DROP TABLE _gone")
            conn.execute("DELETE FROM score_stats WHERE partition_key = ?", [partition_key])
            conn.execute("DELETE FROM lineage WHERE partition_key = ?", [partition_key])
            if not keep_registry:
                conn.execute("DELETE FROM tars WHERE partition_key = ?", [partition_key])
            schema.refresh_view_if_needed(conn, self.tables, None)

        self._write(work)

    def stale_partitions(self, model_fingerprint: str, source: str | None = None) -> list[str]:
        """Registered tars whose score stats are missing or came from another model fingerprint."""
        sql = """
            SELECT t.partition_key FROM tars t LEFT JOIN score_stats s USING (partition_key)
            WHERE (? IS NULL OR t.source = ?)
              AND (s.partition_key IS NULL OR s.model_fingerprint IS DISTINCT FROM ?)
            ORDER BY t.partition_key"""
        rows = self._read(lambda conn: conn.execute(sql, [source, source, model_fingerprint]).fetchall())
        return [r[0] for r in rows]

    def missing_partitions(self, source: str | None = None) -> list[str]:
        """Registered tars with no score stats yet."""
        sql = """
            SELECT t.partition_key FROM tars t ANTI JOIN score_stats s USING (partition_key)
            WHERE ? IS NULL OR t.source = ? ORDER BY t.partition_key"""
        return [r[0] for r in self._read(lambda conn: conn.execute(sql, [source, source]).fetchall())]

    # -- thresholds -----------------------------------------------------------------------------------------

    def compute_threshold(
        self,
        source: str | None = None,
        keep_fraction: float | None = None,
        absolute: float | None = None,
        *,
        record: bool = True,
        model_fingerprint: str | None = None,
        files: schema.ScoreFiles | None = None,
        method: str = AUTO,
    ) -> list[ThresholdRow]:
        """Per-source thresholds over the ok rows of every score table.

        Keep-fraction mode (default, ``keep_fraction=0.3`` when neither is given): with n ok scores in a
        source, ``k = max(1, ceil(keep * n))`` and the threshold is the k-th highest score (the score at quantile
        ``1 - keep``); ``kept = count(score >= threshold)``. Absolute mode: the threshold is ``absolute``.

        Args:
            source: one source, or None for every source.
            keep_fraction: in (0, 1].
            absolute: a finite score.
            record: append the rows to ``thresholds`` (one ``selection_id`` per call).
            model_fingerprint: only rows scored by this model.
            files: for the exact method, the scan of :meth:`score_files` to read (default: scanned now);
                unreadable tables are left out with a warning, and the caller may report ``files.bad``.
            method: ``exact`` scans every score table; ``stats`` reads the fine histograms recorded at scoring
                time (``score_hist``: exact to one bin of width
                :data:`~unifilter_core.catalog.schema.FINE_WIDTH`, seconds at a million tables);
                ``auto`` (default) is exact up to :data:`EXACT_MAX_TABLES` tables with statistics, and
                statistics beyond when every table has its fine histogram.

        Returns:
            One row per source with ok scores, by source name (empty when nothing is scored yet).

        Raises:
            ValueError: invalid keep_fraction/absolute/method (checked before any work).
        """
        if absolute is None and keep_fraction is None:
            keep_fraction = DEFAULT_KEEP_FRACTION
        mode, value = validate_selection(keep_fraction, absolute)
        method = self.threshold_method(method)
        rows: list[ThresholdRow] = []
        if method == STATS:
            rows = self._read(
                lambda conn: thresholds_from_stats(conn, mode, value, lo=schema.FINE_LO, width=schema.FINE_WIDTH,
                                                   source=source, model_fingerprint=model_fingerprint)
            )  # fmt: skip
        else:
            files = files if files is not None else self.score_files()
            if files.good:
                conn = self.connect_parquet()  # parquet only: no catalog lock needed
                try:
                    rows = query_thresholds(
                        conn, files.good, mode, value, source=source, model_fingerprint=model_fingerprint
                    )
                finally:
                    conn.close()
        now = schema.utcnow()
        for r in rows:
            r.scored_at = now
        if record and rows:
            self._record_thresholds(rows)
        return rows

    def threshold_method(self, method: str = AUTO) -> str:
        """``exact`` or ``stats``: what :meth:`compute_threshold` does for ``method`` (``auto`` decides by the
        number of tables with statistics). Raises ValueError for an unknown method."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if method != AUTO:
            return method
        tables, without_fine = self._read(
            lambda conn: conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE fine_bins IS NULL) FROM score_stats"
            ).fetchone()
        )
        return STATS if tables > EXACT_MAX_TABLES and not without_fine else EXACT

    def _record_thresholds(self, rows: Sequence[ThresholdRow]) -> None:
        selection_id = uuid.uuid4().hex
        params = [
            [selection_id, r.source, r.mode, r.keep_fraction, r.threshold, r.kept, r.total, r.score_mean,
             r.score_min, r.score_max, r.scored_at, r.model_fingerprint, r.method]
            for r in rows
        ]  # fmt: skip
        sql = (
            "INSERT INTO thresholds (selection_id, source, mode, keep_fraction, threshold, kept, total, "
            "score_mean, score_min, score_max, scored_at, model_fingerprint, method) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        )
        self._write(lambda conn: conn.executemany(sql, params))

    # -- generation ledger ----------------------------------------------------------------------------------

    def ingest_ledger(self, path: str | Path, kind: str | None = None) -> int:
        """Upsert the latest event per ``request_id`` of one ``ledger.jsonl`` (idempotent; torn lines skipped).

        Args:
            path: the ledger file.
            kind: the kind for events that carry none; default the ledger's folder name.

        Returns:
            The number of request ids upserted.
        """
        from unifilter_core.catalog.ledger import ledger_upsert

        path = Path(path).resolve()
        sql, params = ledger_upsert(path, kind or path.parent.name, schema.utcnow())
        if params:
            self._write(lambda conn: conn.executemany(sql, params))
        return len(params)

    def ingest_ledgers(self) -> int:
        """Ingest every ``<root>/synthetic/<kind>/ledger.jsonl``; returns the request ids upserted."""
        return sum(self.ingest_ledger(p) for p in sorted((self.root / "synthetic").glob("*/ledger.jsonl")))

    # -- maintenance and ad-hoc queries ---------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Schema upgrade, ledger ingestion, stats for score parquet not yet (or no longer freshly) summarised,
        and a scores view rebuild.

        Each table is keyed by the partition key it records (its manifest, else its ``partition_key`` column),
        so stats join ``tars`` whatever folder the table sits in; the statistics come from its manifest
        (recorded at scoring time) and are written in batches (:mod:`unifilter_core.catalog.ingest`). A table
        that does not read is skipped with a warning, never fatal.

        Returns:
            ``ledger_requests`` and ``score_stats`` (counts) and ``unreadable`` (``"path: why"`` per table left
            out).
        """
        from unifilter_core.catalog.ingest import refresh_stats

        self.ensure_schema()
        files = self.score_files()
        done: dict[str, Any] = {"ledger_requests": self.ingest_ledgers()}
        done["score_stats"], unreadable = refresh_stats(self, files.good)
        self.refresh_scores_view()
        done["unreadable"] = [f"{p}: {why}" for p, why in files.bad] + unreadable
        return done

    def query(self, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run one SQL statement on a read-only connection (writes fail); returns (column names, rows)."""

        def work(conn: duckdb.DuckDBPyConnection) -> tuple[list[str], list[tuple[Any, ...]]]:
            cur = conn.execute(sql, list(params) if params else None)
            if cur.description is None:
                return [], []
            return [c[0] for c in cur.description], cur.fetchall()

        try:
            return self._read(work)
        except duckdb.Error as exc:
            if not self._names_unreadable_table(exc):
                raise
            # a score table went bad after the view was built: rebuild it without that file, then retry once
            logger.warning("query hit an unreadable score table (%s); rebuilding the scores view", exc)
            self.refresh_scores_view()
            return self._read(work)

    def _names_unreadable_table(self, exc: duckdb.Error) -> bool:
        """True when the error names a score parquet under this root (the view is then rebuilt without it)."""
        text = str(exc)
        return str(self.tables / "scores") in text and ".parquet" in text
