"""``unifilter synth caption|interleaved``: synthetic (example, quality level) pairs.

Two backends write the same UniFilter training JSON (``train.json``, ``val.json``, ``images/``): ``world`` (the
offline procedural generator) and ``claude`` (the Anthropic API; reruns resume and never pay twice).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from unifilter_core.cli import CLIError
from unifilter_core.records import SAMPLE_KINDS

logger = logging.getLogger(__name__)

_SOURCE_HELP = "world | images DIR | llava JSON | obelics DIR"
# flags that only the claude backend uses (dest names); None means "not given"
_CLAUDE_FLAGS = ("model", "budget_usd", "mode", "limit", "concurrency", "max_tokens", "poll_interval")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write synthetic (example, quality level) pairs with Claude or the offline world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("kind", choices=SAMPLE_KINDS)
    p.add_argument(
        "--source", nargs="+", required=True, metavar="SPEC", help=f"where images come from: {_SOURCE_HELP}"
    )
    p.add_argument(
        "--image-folder", type=Path, help="image folder of a llava JSON (default: images/ next to it)"
    )
    p.add_argument(
        "--backend", choices=("claude", "world"), help="default: world for --source world, claude otherwise"
    )
    p.add_argument("--out", type=Path, help="output folder (default: <data root>/synthetic/<kind>)")
    p.add_argument("--data-root", type=Path, help="data root (default: $UNIFILTER_HOME or ./.unifilter)")
    g = p.add_argument_group("claude backend")
    g.add_argument("--model", help="Claude model id (default: claude-sonnet-5)")
    g.add_argument("--budget-usd", type=float, help="cap on the output folder's total cost (default 5.0)")
    g.add_argument(
        "--mode", choices=("messages", "batches", "auto"), help="API (default auto: batches > 100)"
    )
    g.add_argument("--limit", type=int, help="at most N requests (images or image sets)")
    g.add_argument("--concurrency", type=int, help="parallel Messages requests (default 4)")
    g.add_argument("--max-tokens", type=int, help="max output tokens per request (default 2048)")
    g.add_argument(
        "--images-per-document", type=int, default=3, help="image-set size for documents (default 3)"
    )
    g.add_argument("--poll-interval", type=float, help="seconds between batch polls (default 30)")
    p.set_defaults(func=run)


def parse_source(tokens: list[str], image_folder: Path | None) -> Any:
    """``["images", "DIR"]`` -> a :class:`~unifilter_core.synth.claude_sources.SourceSpec`."""
    from unifilter_core.synth.claude_sources import SOURCE_TYPES, SourceSpec

    kind, rest = tokens[0], tokens[1:]
    if kind not in SOURCE_TYPES:
        raise CLIError(f"--source must be one of: {_SOURCE_HELP} (got {kind!r})")
    if (kind == "world") != (len(rest) == 0) or len(rest) > 1:
        raise CLIError(f"--source {kind} takes {'no path' if kind == 'world' else 'exactly one path'}")
    return SourceSpec(kind, Path(rest[0]) if rest else None, image_folder if kind == "llava" else None)


def run(args: argparse.Namespace) -> int:
    from unifilter_core.paths import data_root, synthetic_dir

    root = data_root(args.data_root)
    out = args.out or synthetic_dir(root, args.kind)
    spec = parse_source(args.source, args.image_folder)
    backend = args.backend or ("world" if spec.type == "world" else "claude")
    if backend == "world":
        ignored = [f"--{name.replace('_', '-')}" for name in _CLAUDE_FLAGS if getattr(args, name) is not None]
        if ignored:
            logger.warning("ignored with --backend world: %s", " ".join(ignored))
    result = _generate(args, backend, spec, out, root)
    print(json.dumps(result.summary, indent=1, sort_keys=True))
    return 0


def _generate(args: argparse.Namespace, backend: str, spec: Any, out: Path, root: Path) -> Any:
    """:func:`unifilter_core.synth.generate.generate_pairs` with the flags; its errors worded for the shell."""
    from unifilter_core.synth.claude_sources import MissingWorldImagesError
    from unifilter_core.synth.generate import (
        BackendUnavailableError,
        ClaudeAPIError,
        GenerationError,
        SourceMismatchError,
        generate_pairs,
    )

    config, run_errors = None, ()
    try:
        if backend == "claude":
            try:
                from unifilter_core.synth.claude_config import ClaudeConfig, ClaudeRunError
            except ImportError as exc:
                raise BackendUnavailableError("claude", exc) from exc
            run_errors = (ClaudeRunError,)
            config = ClaudeConfig(**{k: v for k, v in _claude_overrides(args).items() if v is not None})
        return generate_pairs(
            backend,
            args.kind,
            out,
            source=spec,
            claude_config=config,
            limit=args.limit,
            data_root=root,
            # the default folder may hold the demo's world pairs: keep them as synthetic/<kind>.world
            move_world_pairs=args.out is None,
        )
    except SourceMismatchError as exc:
        raise CLIError(
            "--backend world generates its own images: use --source world (or --backend claude)"
        ) from exc
    except MissingWorldImagesError as exc:
        raise CLIError(f"{exc}: run `unifilter world` first") from exc
    except ClaudeAPIError as exc:
        raise CLIError(f"{exc}; rerun the same command to resume") from exc
    except (
        ValueError,
        GenerationError,
        *run_errors,
    ) as exc:  # flags, source, folder conflicts, key, refusals
        raise CLIError(str(exc)) from exc


def _claude_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``ClaudeConfig`` fields given on the command line (None: not given)."""
    return {
        "model": args.model,
        "budget_usd": args.budget_usd,
        "mode": args.mode,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "poll_interval_s": args.poll_interval,
        "images_per_document": args.images_per_document,
    }
