"""What happened to one tar: :class:`TarScoreSummary`, built by the engine or read back from a manifest."""

from __future__ import annotations

from dataclasses import dataclass, field

from unifilter_core.scoring.table import manifest_path_for, read_manifest
from unifilter_core.storage import Location


@dataclass(slots=True)
class TarScoreSummary:
    """What happened to one tar.

    Attributes:
        tar_path: the input tar (a local path, or a :class:`upath.UPath` for a store URL).
        table_path: the score table (``<out_dir>/<stem>.parquet``), local or on a store.
        manifest_path: its manifest.
        partition_key: ``<source>_<NNNN>``.
        resumed: True when an up-to-date table already existed and nothing was computed.
        rows: rows in the table (one per sample).
        by_status: row counts by status (``ok`` / ``skipped`` / ``error``).
        by_reason: row counts by reason code.
        wall_s: seconds spent scoring (0 when resumed).
        model_s: seconds inside ``scorer.forward``.
        error: why the tar could not be scored (no table was written), else None.
    """

    tar_path: Location
    table_path: Location
    manifest_path: Location
    partition_key: str
    resumed: bool
    rows: int
    by_status: dict[str, int] = field(default_factory=dict)
    by_reason: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    model_s: float = 0.0
    error: str | None = None

    @property
    def failed(self) -> bool:
        """True when the tar could not be scored (see ``error``)."""
        return self.error is not None

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s > 0 else 0.0

    def describe(self) -> str:
        """One line for humans: ``00000042.tar: 1000 rows (ok 990, skipped 4, error 6), 123.4 samples/s``."""
        if self.error is not None:
            return f"{self.tar_path.name}: FAILED, no table written: {self.error}"
        counts = ", ".join(f"{s} {self.by_status.get(s, 0)}" for s in ("ok", "skipped", "error"))
        tail = "up to date, skipped" if self.resumed else f"{self.samples_per_s:.1f} samples/s"
        return f"{self.tar_path.name}: {self.rows} rows ({counts}), {tail}"


def summary_from_manifest(tar_path: Location, table: Location, pkey: str) -> TarScoreSummary:
    """The summary of an up-to-date table (``resumed=True``), from its manifest."""
    manifest_path = manifest_path_for(table)
    manifest = read_manifest(manifest_path) or {}
    counts = manifest.get("counts", {})
    return TarScoreSummary(
        tar_path,
        table,
        manifest_path,
        pkey,
        resumed=True,
        rows=int(manifest.get("table", {}).get("rows", 0)),
        by_status=dict(counts.get("status", {})),
        by_reason=dict(counts.get("reason", {})),
    )
