"""``unifilter score caption|interleaved``: the original scoring scripts' flags, on the streaming engine.

Example (tiny test data)::

    unifilter score caption --model-path ckpt/ --tar-file-path shards/ --gpu-id 0 --batch-size 16 \\
        --tars-per-gpu 128 --output-dir scores/ --device cpu

Differences from the original scripts: tars are discovered (sorted ``<number>.tar`` files) instead of probing a
fixed id range; ``--gpu-id I --tars-per-gpu N`` select positions ``[I*N, (I+1)*N)`` of that list (a block past the
end prints a message and exits 0, so a launcher may start more GPUs than there are blocks); tables go to
``<data root>/scores/<source>/`` (or ``--output-dir``), never into the input folder; a tar is skipped only when
its table's manifest matches the tar, the model and the scoring config.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from unifilter_core.cli import CLIError
from unifilter_core.paths import data_root, scores_dir

_DEFAULT_BATCH = {"caption": 16, "interleaved": 4}
_SOURCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


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
        _add_flags(p, kind)
        p.set_defaults(func=run_score)


def _add_flags(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--model-path", required=True, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--tar-file-path", required=True, help="folder of <number>.tar shards, or one .tar file")
    p.add_argument(
        "--gpu-id", type=int, default=0, help="block index: tars [I*N, (I+1)*N) of the sorted list"
    )
    p.add_argument("--batch-size", type=int, default=_DEFAULT_BATCH[kind], help="samples per model call")
    p.add_argument("--tars-per-gpu", type=int, default=None, help="block size N (default: every tar)")
    p.add_argument("--output-dir", default=None, help="where tables go (default <data root>/scores/<source>)")
    p.add_argument("--root", default=None, help="data root (default $UNIFILTER_HOME or ./.unifilter)")
    p.add_argument("--source", default=None, help="source name (default: the tar folder's name)")
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | cuda:K | auto (default). With cuda/auto the GPU is --gpu-id modulo the visible GPUs",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="model dtype (default float32 on CPU, bfloat16 on GPU); the head runs in fp32",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="decode worker processes (0 = in-process; default: CPU cores - 1, at least 1)",
    )
    p.add_argument("--max-batch-tokens", type=int, default=None, help="padded-token budget per model call")
    p.add_argument("--force", action="store_true", help="rescore even when a table is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--vision-tower", default=None, help="local SigLIP folder (checkpoints without tower weights)"
    )
    p.add_argument(
        "--packing",
        choices=("off", "on", "auto"),
        default="auto",
        help="padding-free packed batches (auto: only where a fast varlen attention kernel passes its check)",
    )
    p.add_argument(
        "--compile-vision",
        default=None,
        metavar="MODE",
        help="torch.compile the vision tower with this mode (e.g. max-autotune-no-cudagraphs); GPU only",
    )
    p.add_argument("--vision-batch-size", type=int, default=None, help="images per vision-tower call")


def resolve_device(device: str, gpu_id: int) -> str:
    """``auto`` -> ``cuda:<gpu_id mod visible GPUs>`` when CUDA is available, else ``cpu``; ``cuda`` likewise.

    Raises:
        CLIError: CUDA requested but not available, or an unknown device string.
    """
    import torch

    if device == "cpu":
        return "cpu"
    if device in ("auto", "cuda"):
        if not torch.cuda.is_available():
            if device == "cuda":
                raise CLIError("--device cuda requested but CUDA is not available here; use --device cpu")
            return "cpu"
        return f"cuda:{gpu_id % torch.cuda.device_count()}"
    if re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available() or int(device[5:]) >= torch.cuda.device_count():
            raise CLIError(f"--device {device} is not available here")
        return device
    raise CLIError(f"--device must be cpu, cuda, cuda:K or auto, got {device!r}")


def _check_numbers(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.gpu_id < 0:
        raise CLIError(f"--gpu-id must be >= 0, got {args.gpu_id}")
    if args.tars_per_gpu is not None and args.tars_per_gpu < 1:
        raise CLIError(f"--tars-per-gpu must be >= 1, got {args.tars_per_gpu}")
    if args.num_workers is not None and args.num_workers < 0:
        raise CLIError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.max_batch_tokens is not None and args.max_batch_tokens < 1:
        raise CLIError(f"--max-batch-tokens must be >= 1, got {args.max_batch_tokens}")
    if args.vision_batch_size is not None and args.vision_batch_size < 1:
        raise CLIError(f"--vision-batch-size must be >= 1, got {args.vision_batch_size}")


def _plan(args: argparse.Namespace) -> tuple[list[Path], Path, str]:
    """Discover the block of tars, the output folder and the source name (all checks before any work)."""
    from unifilter_core.scorer import resolve_checkpoint
    from unifilter_core.scoring import discover_tars, select_block

    _check_numbers(args)
    try:
        resolve_checkpoint(args.model_path)
    except ValueError as exc:
        raise CLIError(f"bad --model-path: {exc}") from None
    try:
        tars = discover_tars(args.tar_file_path)
        block = select_block(tars, args.gpu_id, args.tars_per_gpu)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    input_dir = tars[0].parent
    source = args.source or input_dir.name
    if not _SOURCE_RE.fullmatch(source):
        raise CLIError(f"source name {source!r} must match {_SOURCE_RE.pattern}; pass --source NAME")
    out = (
        Path(args.output_dir).expanduser().resolve()
        if args.output_dir
        else scores_dir(data_root(args.root), source)
    )
    if out == input_dir or out.exists() and out.samefile(input_dir):
        raise CLIError(f"--output-dir {str(out)!r} is the input folder; score tables must go elsewhere")
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output-dir {str(out)!r} exists and is not a folder")
    return block, out, source


def _load(args: argparse.Namespace, device: str, dtype: str) -> Any:
    from unifilter_core.scorer import load_scorer

    try:
        packing = {"off": False, "on": True, "auto": "auto"}[args.packing]
        return load_scorer(
            args.model_path,
            device=device,
            dtype=dtype,
            batch_size=args.batch_size,
            vision_tower=args.vision_tower,
            packing=packing,
            compile_vision=args.compile_vision if device != "cpu" else None,
            vision_batch_size=args.vision_batch_size,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot load checkpoint {args.model_path!r}: {first}") from None


def run_score(args: argparse.Namespace) -> int:
    """Entry point of ``unifilter score KIND``: returns the exit code."""
    from unifilter_core.scoring import ScoringConfig, score_tars

    block, out, source = _plan(args)
    if not block:
        print(
            f"unifilter score: block {args.gpu_id} (tars-per-gpu {args.tars_per_gpu}) is past the end of the "
            f"{len(_discovered(args))} tars found; nothing to do",
            file=sys.stderr,
        )
        return 0
    device = resolve_device(args.device, args.gpu_id)
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    num_workers = args.num_workers if args.num_workers is not None else max(1, (os.cpu_count() or 2) - 1)
    try:
        config = ScoringConfig(
            batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens, num_workers=num_workers
        )
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    scorer = _load(args, device, dtype)
    print(f"unifilter score: {len(block)} tar(s) from {block[0].parent} -> {out} ({device}, {dtype})")
    total_rows, total_s = 0, 0.0
    for summary in score_tars(
        block,
        scorer,
        out,
        kind=args.kind,
        source=source,
        config=config,
        progress=not args.no_progress,
        force=args.force,
    ):
        print(summary.describe(), flush=True)
        total_rows += summary.rows
        total_s += summary.wall_s
    rate = f", {total_rows / total_s:.1f} samples/s" if total_s > 0 else ""
    print(f"unifilter score: done: {len(block)} tar(s), {total_rows} rows{rate}")
    return 0


def _discovered(args: argparse.Namespace) -> list[Path]:
    from unifilter_core.scoring import discover_tars

    return discover_tars(args.tar_file_path)
