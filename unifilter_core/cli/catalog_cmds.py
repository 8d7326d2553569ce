"""``unifilter thresholds`` and ``unifilter catalog sql|refresh``: the DuckDB catalog from the shell."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path
from typing import Any

import duckdb

from unifilter_core.catalog import Catalog, CatalogBusyError, format_table, validate_selection
from unifilter_core.cli import CLIError
from unifilter_core.paths import catalog_path, data_root


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``thresholds`` and ``catalog`` subcommands."""
    th = subparsers.add_parser(
        "thresholds",
        help="per-source score thresholds for a keep fraction (or an absolute score)",
        description="Per source, the score that keeps the best --keep share of scored samples (default 0.3), "
        "or the kept counts for an --absolute score, over every score table under the data root.",
    )
    _add_root(th)
    mode = th.add_mutually_exclusive_group()
    mode.add_argument(
        "--keep", type=float, default=None, metavar="F", help="keep fraction in (0, 1] (default 0.3)"
    )
    mode.add_argument(
        "--absolute", type=float, default=None, metavar="X", help="keep samples with score >= X"
    )
    th.add_argument("--source", default=None, help="only this source")
    th.add_argument("--json", action="store_true", help="print JSON instead of a table")
    th.add_argument("--record", action="store_true", help="also append the result to the thresholds table")
    th.add_argument(
        "--method",
        choices=("auto", "exact", "stats"),
        default="auto",
        help="exact: scan every score table; stats: the fine histograms recorded at scoring time (exact to "
        "0.01, seconds at a million tables); auto (default): exact up to 10,000 tables, stats beyond",
    )
    th.set_defaults(func=_cmd_thresholds)

    cat = subparsers.add_parser("catalog", help="query or refresh the DuckDB catalog")
    csub = cat.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    sql = csub.add_parser("sql", help="run one read-only SQL query against the catalog")
    _add_root(sql)
    sql.add_argument("query", help='e.g. "SELECT source, count(*) FROM scores GROUP BY source"')
    sql.add_argument("--json", action="store_true", help="print rows as JSON objects")
    sql.set_defaults(func=_cmd_sql)
    ref = csub.add_parser(
        "refresh", help="create/upgrade the schema, rebuild the scores view, ingest ledgers, fill score_stats"
    )
    _add_root(ref)
    ref.set_defaults(func=_cmd_refresh)
    card = csub.add_parser(
        "card", help="(re)write filtered/<source>/README.md, the dataset card of a filtered source"
    )
    _add_root(card)
    card.add_argument("source", help="the source name (e.g. datacomp)")
    card.add_argument("--kind", choices=("caption", "interleaved"), default=None,
                      help="the source's kind (default: the one its registered tars have)")  # fmt: skip
    card.set_defaults(func=_cmd_card)


def _cmd_card(args: argparse.Namespace) -> int:
    from unifilter_core.dataset_card import write_dataset_card

    catalog = _open(args, create=False)
    kind = args.kind
    if kind is None:
        _, rows = catalog.query("SELECT DISTINCT kind FROM tars WHERE source = ?", [args.source])
        if len(rows) != 1 or rows[0][0] is None:
            raise CLIError(f"source {args.source!r}: give --kind (registered kinds: {[r[0] for r in rows]})")
        kind = rows[0][0]
    try:
        card = write_dataset_card(catalog.root, catalog, args.source, kind, tables=catalog.tables)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(card)
    return 0


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="data root (default $UNIFILTER_HOME or ./.unifilter)")
    p.add_argument(
        "--tables",
        default=None,
        metavar="DIR_OR_URL",
        help="where scores/ lives when not in the data root, e.g. s3://bucket/unifilter (default "
        "$UNIFILTER_TABLES, else the data root)",
    )


def _open(args: argparse.Namespace, *, create: bool) -> Catalog:
    r = data_root(args.root)
    try:
        return Catalog(catalog_path(r), root=r, tables=args.tables, create=create)
    except FileNotFoundError:
        raise CLIError(
            f"no catalog at {catalog_path(r)}; run `unifilter demo`, materialize tar_manifest, "
            "or `unifilter catalog refresh --root DIR`"
        ) from None
    except (ValueError, RuntimeError, CatalogBusyError) as exc:
        raise CLIError(str(exc)) from None


def _cmd_thresholds(args: argparse.Namespace) -> int:
    if args.keep is None and args.absolute is None:
        args.keep = 0.3
    try:
        validate_selection(args.keep, args.absolute)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    catalog = _open(args, create=False)
    try:
        method = catalog.threshold_method(args.method)
        files = catalog.score_files() if method == "exact" else None  # stats read no table
        if files is not None:
            _report_unreadable([f"{p}: {why}" for p, why in files.bad])
        rows = catalog.compute_threshold(
            args.source, args.keep, args.absolute, record=args.record, files=files, method=method
        )
    except (duckdb.Error, CatalogBusyError) as exc:
        raise CLIError(f"threshold query failed: {exc}") from None
    if not rows:
        where = f" for source {args.source!r}" if args.source else ""
        raise CLIError(f"no scored samples{where} under {catalog.root / 'scores'}; score some tars first")
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0


def _jsonable(v: Any) -> Any:
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def _cmd_sql(args: argparse.Namespace) -> int:
    catalog = _open(args, create=False)
    try:
        cols, rows = catalog.query(args.query)
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"query failed (the catalog is opened read-only): {first}") from None
    if args.json:
        print(json.dumps([{c: _jsonable(v) for c, v in zip(cols, r, strict=True)} for r in rows], indent=2))
        return 0
    if cols:
        print("\t".join(cols))
        for r in rows:
            print("\t".join("" if v is None else str(v) for v in r))
    return 0


def _cmd_refresh(args: argparse.Namespace) -> int:
    catalog = _open(args, create=True)
    try:
        done = catalog.refresh()
    except (duckdb.Error, CatalogBusyError) as exc:
        raise CLIError(f"refresh failed: {exc}") from None
    print(f"catalog {catalog.path}: {done['score_stats']} score table(s) summarised, "
          f"{done['ledger_requests']} ledger request(s) ingested")  # fmt: skip
    _report_unreadable(done["unreadable"])
    return 0


def _report_unreadable(entries: list[str]) -> None:
    """One warning line per score table left out (``path: why``), on stderr; nothing when there is none."""
    if entries:
        print(
            f"warning: {len(entries)} unreadable score table(s) left out (rescore or delete them):",
            file=sys.stderr,
        )
        for entry in entries:
            print(f"  {entry}", file=sys.stderr)
