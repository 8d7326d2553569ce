"""The ``unifilter`` console script.

Each subcommand lives in its own module of this package and exposes ``register(subparsers)``, which adds an
argparse parser whose ``func`` default takes the parsed namespace and returns an exit code. A CLI module only
builds typed config objects from flags and calls library code; no argparse namespace reaches the library.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from importlib.metadata import entry_points

# module names under unifilter_core.cli, in the order their subcommands are listed in --help
_COMMAND_MODULES = ("score", "world", "synth", "train", "catalog_cmds", "report")
# Packages that build on the core (unifilter_dagster: `demo`, `ui`) add subcommands through this entry-point
# group; the core never imports them.
_PLUGIN_GROUP = "unifilter.commands"
#: set to 1 for debug logging (tracebacks behind `unifilter: error:` lines), like -v
DEBUG_ENV = "UNIFILTER_DEBUG"


class CLIError(Exception):
    """A user error: printed as one line ``unifilter: error: ...`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unifilter", description="UniFilter: multimodal data quality filtering"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help=f"debug logging, with the traceback behind an error line (also: {DEBUG_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"unifilter_core.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"unifilter_core.cli.{name}":
                continue  # subcommand not part of this build
            raise
        module.register(sub)
    for entry in entry_points(group=_PLUGIN_GROUP):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"unifilter: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unifilter: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
