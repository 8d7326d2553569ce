"""``unifilter report``: write the threshold workbench (one self-contained HTML page) from the catalog."""

from __future__ import annotations

import argparse

from unifilter_core.catalog import Catalog, CatalogBusyError
from unifilter_core.cli import CLIError
from unifilter_core.paths import catalog_path, data_root
from unifilter_core.report import WorkbenchConfig, default_report_path, write_workbench


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="write the threshold workbench: one HTML page with score distributions, live threshold and samples",
        description="Build a self-contained HTML page from the catalog: per source the score histogram, a "
        "threshold control with live kept counts, thumbnails of the lowest, middle and highest scored samples, "
        "quarantine counts by reason and a lineage summary. Open it in a browser from the file; no server.",
    )
    p.add_argument("--root", default=None, help="data root (default $UNIFILTER_HOME or ./.unifilter)")
    p.add_argument(
        "--out", default=None, metavar="FILE", help="output file (default <root>/report/workbench.html)"
    )
    p.add_argument(
        "--keep", type=float, default=0.3, metavar="F", help="default keep fraction per source (default 0.3)"
    )
    p.add_argument(
        "--samples-per-band", type=int, default=6, metavar="N", help="thumbnails per score band (default 6)"
    )
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    config = WorkbenchConfig(keep_fraction=args.keep, samples_per_band=args.samples_per_band)
    try:
        config.validate()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    root = data_root(args.root)
    try:
        catalog = Catalog(catalog_path(root), root=root, create=False)
    except FileNotFoundError:
        raise CLIError(
            f"no catalog at {catalog_path(root)}; run `unifilter demo` or materialize tar_manifest first"
        ) from None
    except (ValueError, CatalogBusyError) as exc:
        raise CLIError(str(exc)) from None
    out = args.out if args.out is not None else default_report_path(root)
    try:
        summary = write_workbench(catalog, config, out)
    except CatalogBusyError as exc:
        raise CLIError(str(exc)) from None
    print(
        f"wrote {summary.path} ({summary.size_bytes / 1e6:.1f} MB, {summary.n_sources} source(s), "
        f"{summary.n_thumbnails} thumbnails); open it in a browser: file://{summary.path.resolve()}"
    )
    return 0
