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
    p.add_argument("kind", choices=("caption", "interleaved"))
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
    """``["images", "DIR"]`` -> a :class:`~unifilter_core.synth.claude.SourceSpec`."""
    from unifilter_core.synth.claude import SOURCE_TYPES, SourceSpec

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
    from unifilter_core.synth.pairs_folder import PairsFolderConflict, move_world_pairs_aside

    try:
        if backend == "world":
            summary = _run_world(args, spec, out)
        else:
            # the default folder may hold the demo's world pairs: keep them as synthetic/<kind>.world
            moved = move_world_pairs_aside(out) if args.out is None else None
            summary = _run_claude(args, spec, out, root)
            if moved is not None:
                summary["world_pairs_moved_to"] = str(moved)
    except PairsFolderConflict as exc:
        raise CLIError(str(exc)) from exc
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


def _run_world(args: argparse.Namespace, spec: Any, out: Path) -> dict[str, Any]:
    if spec.type != "world":
        raise CLIError("--backend world generates its own images: use --source world (or --backend claude)")
    ignored = [f"--{name.replace('_', '-')}" for name in _CLAUDE_FLAGS if getattr(args, name) is not None]
    if ignored:
        logger.warning("ignored with --backend world: %s", " ".join(ignored))
    try:
        from unifilter_core.synth.world import WorldConfig, write_synthetic_pairs
    except ImportError as exc:
        raise CLIError(f"the world backend is not available in this build ({exc})") from exc
    return write_synthetic_pairs(args.kind, out, WorldConfig())


def _run_claude(args: argparse.Namespace, spec: Any, out: Path, root: Path) -> dict[str, Any]:
    import anthropic

    from unifilter_core.synth.claude import (
        ClaudeConfig,
        ClaudeRunError,
        MissingAPIKeyError,
        load_items,
        run_claude_generation,
    )

    overrides = {
        "model": args.model,
        "budget_usd": args.budget_usd,
        "mode": args.mode,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "poll_interval_s": args.poll_interval,
        "images_per_document": args.images_per_document,
    }
    try:
        config = ClaudeConfig(**{k: v for k, v in overrides.items() if v is not None})
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        items, skipped = load_items(
            args.kind,
            spec,
            images_per_document=config.images_per_document,
            limit=args.limit,
            data_root=root,
        )
        summary = run_claude_generation(args.kind, items, out, config)
    except (MissingAPIKeyError, ClaudeRunError, ValueError) as exc:
        raise CLIError(str(exc)) from exc
    except anthropic.APIError as exc:
        raise CLIError(
            f"Anthropic API error ({type(exc).__name__}); rerun the same command to resume"
        ) from exc
    summary["skipped_sources"] = skipped
    return summary
