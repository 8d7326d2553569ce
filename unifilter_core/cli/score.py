"""``unifilter score caption|interleaved``: the original scoring scripts' flags, on the streaming engine.

Example (tiny test data)::

    unifilter score caption --model-path ckpt/ --tar-file-path shards/ --gpu-id 0 --batch-size 16 \\
        --tars-per-gpu 128 --output-dir scores/ --device cpu

As the original scripts, ``--gpu-id I --tars-per-gpu N`` (default N = 128) scores the tars whose ids are in
``[I*N, (I+1)*N)``; the ids of the block with no tar are listed, and a block with no tar at all prints a message
and exits 0 (a launcher may start more GPUs than there are blocks). Differences: tars are discovered
(``<number>.tar`` or ``shard_<number>.tar``) instead of probing ``range(100000)``; tables go to
``<data root>/scores/<source>/`` (or ``--output-dir``), never into the input folder, and that folder belongs to
one input folder (``.source.json``); ``--output-format original`` writes the original's
``<NNNNNNNN>_quality_score.parquet`` (into the tar folder by default, as the original); a tar is skipped only when its table's manifest matches the tar, the model
and the scoring config; a tar that fails does not stop the block (the run ends with exit code 1 naming it).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unifilter_core import storage
from unifilter_core.cli import CLIError
from unifilter_core.cli.score_flags import add_flags, check_refused, scoring_settings
from unifilter_core.paths import data_root, scores_dir

_SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score caption`` and ``score interleaved``."""
    score = subparsers.add_parser(
        "score",
        help="score webdataset tars into one parquet score table per tar",
        description="Score every sample of each tar with a UniFilter checkpoint; one atomic parquet table "
        "(+ manifest) per tar. Reruns skip tars whose table is up to date.",
    )
    kinds = score.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, text in (
        ("caption", "image-caption tars (DataComp layout)"),
        ("interleaved", "OBELICS-style tars"),
    ):
        p = kinds.add_parser(kind, help=text, description=f"Score {text}.")
        add_flags(p, kind)
        p.set_defaults(func=run_score)


def _check_numbers(args: argparse.Namespace) -> None:
    check_refused(args)
    if args.num_gpus is not None and args.num_gpus < 1:
        raise CLIError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    if args.num_gpus is not None and args.gpu_id >= args.num_gpus:
        raise CLIError(
            f"--gpu-id {args.gpu_id} is outside the fleet of --num-gpus {args.num_gpus} (ids 0..N-1)"
        )
    if args.gpu_id < 0:
        raise CLIError(f"--gpu-id must be >= 0, got {args.gpu_id}")
    if args.tars_per_gpu < 1:
        raise CLIError(f"--tars-per-gpu must be >= 1, got {args.tars_per_gpu}")
    scoring_settings(args)  # the scoring flags, checked before anything is read


@dataclass(frozen=True)
class _Plan:
    """What a run will do, settled before the model loads."""

    block: list[Any]  # Path, or upath.UPath for a store URL
    ids: range
    missing: list[int]
    input_dir: Any
    out: Any
    source: str
    n_found: int


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, (ValueError, OSError)) and type(exc).__module__ == "builtins" and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _check_checkpoint(model_path: str) -> None:
    from unifilter_core.scorer import resolve_checkpoint

    try:
        resolve_checkpoint(model_path)
    except Exception as exc:  # a malformed config.json raises whatever json/attribute error it hits
        logger.debug("checkpoint check failed", exc_info=True)
        if type(exc) is ValueError:  # resolve_checkpoint's own messages name the folder or file
            raise CLIError(f"bad --model-path: {exc}") from None
        config = Path(model_path).expanduser() / "config.json"
        raise CLIError(
            f"bad --model-path: {config} is not a valid UniFilter config.json ({_first_line(exc)}); "
            "restore it from the checkpoint's release"
        ) from None


def _original_output_dir(args: argparse.Namespace, input_dir: Any) -> Any:
    """Where ``--output-format original`` writes: ``--output-dir`` or, as the original, the tar folder.

    Original-form tables have other columns than the catalog's, so they never go under ``<data root>/scores``.
    """
    out = storage.resolved(args.output_dir) if args.output_dir else input_dir
    catalog_scores = (data_root(args.root) / "scores").resolve()
    if not storage.is_url(out) and (out == catalog_scores or catalog_scores in out.parents):
        raise CLIError(
            f"--output-dir {str(out)!r} is under the catalog's score folder {str(catalog_scores)!r}, which holds "
            "only unifilter-format tables; pass another --output-dir for --output-format original"
        )
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {str(out)!r} exists and is not a folder")
    return out


def _same_folder(a: Any, b: Any) -> bool:
    if storage.is_url(a) or storage.is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    return a == b or a.exists() and a.samefile(b)


def _output_dir(args: argparse.Namespace, source: str, input_dir: Any) -> Any:
    from unifilter_core.scoring.source_marker import SourceMismatchError, check_source_marker

    if args.output_format == "original":
        out = _original_output_dir(args, input_dir)
        if out == input_dir:
            return out  # next to the tars, as the original: the folder cannot hold another source's tables
    else:
        out = (
            storage.resolved(args.output_dir) if args.output_dir else scores_dir(data_root(args.root), source)
        )
    if _same_folder(out, input_dir):
        raise CLIError(f"--output-dir {str(out)!r} is the input folder; score tables must go elsewhere")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {str(out)!r} exists and is not a folder")
    try:
        check_source_marker(
            out, source, input_dir, hint="pass --source NAME (a new score folder) or --output-dir DIR"
        )
    except SourceMismatchError as exc:
        raise CLIError(str(exc)) from None
    return out


def _tolerant_path(path: str) -> str:
    """``path``, or ``path`` without trailing whitespace when only that exists.

    The original README's commands end a path with ``\\ `` before the line break, which the shell turns into a
    trailing space (``data/datacomp/medium_vanilla_filter ``).
    """
    stripped = path.rstrip()
    if storage.is_url(path):
        return stripped
    if stripped != path and not Path(path).expanduser().exists() and Path(stripped).expanduser().exists():
        logger.warning(
            "--tar-file-path %r does not exist; using %r (trailing whitespace removed)", path, stripped
        )
        return stripped
    return path


def _plan(args: argparse.Namespace) -> _Plan:
    """Discover the block of tars, the output folder and the source name (all checks before any work)."""
    from unifilter_core.paths import shard_id
    from unifilter_core.scoring.discovery import block_ids, discover_tars, select_block

    _check_numbers(args)
    args.tar_file_path = _tolerant_path(args.tar_file_path)
    _check_checkpoint(args.model_path)
    try:
        tars = discover_tars(args.tar_file_path)
        block = select_block(tars, args.gpu_id, args.tars_per_gpu)
        ids = block_ids(args.gpu_id, args.tars_per_gpu)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    input_dir = tars[0].parent
    source = args.source or input_dir.name
    if not _SOURCE_RE.fullmatch(source):
        raise CLIError(f"source name {source!r} must match {_SOURCE_RE.pattern}; pass --source NAME")
    out = _output_dir(args, source, input_dir)
    present = {shard_id(t) for t in tars}
    missing = (
        []
        if len(tars) == 1 and storage.location(args.tar_file_path).is_file()
        else [i for i in ids if i not in present]
    )
    return _Plan(block, ids, missing, input_dir, out, source, len(tars))


def _check_output(out: Any) -> None:
    from unifilter_core.scoring import output

    try:
        output.check_output_writable(out)
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot write score tables to {out}: {_first_line(exc)}") from None


def _load(args: argparse.Namespace, settings: Any) -> Any:
    from unifilter_core.scorer import load_scorer

    try:
        return load_scorer(args.model_path, settings=settings)
    except Exception as exc:  # safetensors, json, torch and config errors: a bad checkpoint, one line
        logger.debug("checkpoint load failed", exc_info=True)
        raise CLIError(
            f"cannot load checkpoint {args.model_path!r}: {_first_line(exc)} (check config.json and "
            "model.safetensors; -v or UNIFILTER_DEBUG=1 shows the traceback)"
        ) from None


def _describe_block(args: argparse.Namespace, plan: _Plan) -> str:
    from unifilter_core.paths import shard_id
    from unifilter_core.scoring.discovery import compact_ranges

    span = compact_ranges(plan.ids)
    have = compact_ranges(shard_id(t) or 0 for t in plan.block)
    text = f"block {args.gpu_id} (tars-per-gpu {args.tars_per_gpu}, ids {span}): tar ids {have or 'none'}"
    if plan.missing:
        text += f"; missing ids {compact_ranges(plan.missing)}"
    return text


def run_score(args: argparse.Namespace) -> int:
    """Entry point of ``unifilter score KIND``: returns the exit code (1 when a tar of the block failed)."""
    from unifilter_core.scoring.discovery import compact_ranges

    plan = _plan(args)
    if not plan.block:
        print(
            f"unifilter score: block {args.gpu_id} (tars-per-gpu {args.tars_per_gpu}, ids "
            f"{compact_ranges(plan.ids)}) has none of the {plan.n_found} tar(s) in {plan.input_dir}; nothing to do",
            file=sys.stderr,
        )
        return 0
    if args.ray_address:
        return _run_on_ray(args, plan)
    settings = scoring_settings(args, resolve=True)
    try:
        config = settings.scoring_config()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    _check_output(plan.out)
    scorer = _load(args, settings)
    print(f"unifilter score: {_describe_block(args, plan)}")
    print(
        f"unifilter score: {len(plan.block)} tar(s) from {plan.input_dir} -> {plan.out} "
        f"({settings.device}, {settings.dtype})"
    )
    from unifilter_core.scoring import score_tars

    summaries = score_tars(
        plan.block,
        scorer,
        plan.out,
        kind=args.kind,
        source=plan.source,
        config=config,
        progress=not args.no_progress,
        force=args.force,
        output_format=args.output_format,
    )
    return _finish(plan, summaries)


def _run_on_ray(args: argparse.Namespace, plan: _Plan) -> int:
    """``--ray-address``: the block on a Ray cluster, one resident model per actor."""
    from unifilter_core.scorer import resolve_checkpoint
    from unifilter_core.scoring.ray_engine import RaySettings, score_tars_on_ray

    try:
        ray_settings = RaySettings(args.ray_address, args.ray_workers, args.ray_cpus_per_worker)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    _check_output(plan.out)
    print(f"unifilter score: {_describe_block(args, plan)}")
    print(
        f"unifilter score: {len(plan.block)} tar(s) from {plan.input_dir} -> {plan.out} (Ray {args.ray_address})"
    )
    summaries = score_tars_on_ray(
        plan.block,
        plan.out,
        checkpoint=str(resolve_checkpoint(args.model_path)),
        settings=scoring_settings(args),
        kind=args.kind,
        source=plan.source,
        ray_settings=ray_settings,
        force=args.force,
        output_format=args.output_format,
    )
    try:
        return _finish(plan, summaries)
    except RuntimeError as exc:  # the workers could not load the model
        raise CLIError(str(exc)) from None


def _finish(plan: _Plan, summaries: Any) -> int:
    """Print each tar's line as it comes and the failures at the end; the exit code."""
    from unifilter_core.scoring.source_marker import write_source_marker

    try:
        if not _same_folder(plan.out, plan.input_dir):
            write_source_marker(plan.out, plan.source, plan.input_dir)
        failed = _score_block(summaries)
    except OSError as exc:
        raise CLIError(_os_error_line(exc, plan.out)) from None
    if failed:
        print(f"unifilter score: {len(failed)} of {len(plan.block)} tar(s) failed:", file=sys.stderr)
        for name, error in failed:
            print(f"  {name}: {error}", file=sys.stderr)
        return 1
    return 0


def _score_block(summaries: Any) -> list[tuple[str, str]]:
    """Print one line per tar as each is done; returns ``(tar name, error)`` of the tars that failed."""
    total_rows, total_s, failed, n = 0, 0.0, [], 0
    for summary in summaries:
        n += 1
        print(summary.describe(), flush=True)
        error = getattr(summary, "error", None)
        if error:
            failed.append((summary.tar_path.name, str(error)))
        total_rows += summary.rows
        total_s += summary.wall_s
    rate = f", {total_rows / total_s:.1f} samples/s" if total_s > 0 else ""
    print(f"unifilter score: done: {n} tar(s), {total_rows} rows{rate}")
    return failed


def _os_error_line(exc: OSError, out: Any) -> str:
    """One line for a disk-full / permission / other OS error met while writing score tables."""
    import errno

    where = exc.filename or getattr(exc, "path", None) or out
    what = exc.strerror or _first_line(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        todo = "free disk space (or pass --output-dir on another disk) and rerun: finished tables are kept"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = "make the folder writable or pass --output-dir DIR, then rerun"
    else:
        todo = "fix the cause and rerun: finished tables are kept and skipped"
    return f"writing {where}: {what}; {todo}"
