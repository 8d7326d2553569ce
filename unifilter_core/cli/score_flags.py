"""The flags of ``unifilter score caption|interleaved`` and the settings object they build.

The scoring flags are :class:`~unifilter_core.scoring.settings.ScoringSettings` fields of the same name (a flag
``--batch-size`` is the field ``batch_size``); the original scripts' flags that mean nothing here are refused
with what to use instead.
"""

from __future__ import annotations

import argparse
from typing import Any

from unifilter_core.cli import CLIError

#: the original scripts' block size
DEFAULT_TARS_PER_GPU = 128
# the batch size ScoringSettings.resolve picks per kind, for --help only (importing the settings loads torch)
_DEFAULT_BATCH_HELP = {"caption": 16, "interleaved": 4}
_CPU_BATCH_HELP = {"caption": 16, "interleaved": 2}


#: flags of the original scripts that have no meaning here: flag -> (why, what to use instead)
REFUSED_FLAGS: dict[str, tuple[str, str]] = {
    "--model-base": (
        "checkpoints are complete here (LLM, projector, head and usually the vision tower)",
        "pass the checkpoint as --model-path (and a separate tower as --vision-tower)",
    ),
    "--conv-mode": (
        "scoring uses no chat template (the original scripts ignored the flag too)",
        "drop the flag",
    ),
    "--temperature": ("scoring generates no text (the original scripts ignored the flag)", "drop the flag"),
    "--max-new-tokens": (
        "scoring generates no text (the original scripts ignored the flag)",
        "drop the flag",
    ),
    "--load-8bit": (
        "8-bit/4-bit bitsandbytes loading is not supported (scores would differ from the released model)",
        "use --dtype bfloat16 or --dtype float16",
    ),
    "--load-4bit": (
        "8-bit/4-bit bitsandbytes loading is not supported (scores would differ from the released model)",
        "use --dtype bfloat16 or --dtype float16",
    ),
    "--debug": ("there is no separate debug mode", "use `unifilter -v score ...` or UNIFILTER_DEBUG=1"),
}
_VALUE_FLAGS = ("--model-base", "--conv-mode", "--temperature", "--max-new-tokens")


def add_original_flags(p: argparse.ArgumentParser) -> None:
    """The original scripts' other flags: ``--workers``, ``--num-gpus``, ``--max-len`` mapped, the rest refused."""
    p.add_argument(
        "--workers", type=int, dest="num_workers", default=None, help="the original's name for --num-workers"
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="GPUs in the whole fleet (the original's flag): --gpu-id must be below it",
    )
    p.add_argument(
        "--max-len",
        type=int,
        dest="max_length",
        default=None,
        help="longest spliced sequence (text + image tokens); default the checkpoint's "
        "tokenizer_model_max_length. Captions are still capped at 75 ids (EOS kept), as in the original",
    )
    for flag in REFUSED_FLAGS:
        kwargs: dict[str, Any] = {"nargs": 1} if flag in _VALUE_FLAGS else {"action": "store_true"}
        p.add_argument(flag, dest="refused_" + flag[2:].replace("-", "_"), help=argparse.SUPPRESS, **kwargs)


def check_refused(args: argparse.Namespace) -> None:
    for flag, (why, instead) in REFUSED_FLAGS.items():
        if getattr(args, "refused_" + flag[2:].replace("-", "_"), None):
            raise CLIError(f"{flag} is not supported: {why}; {instead}")


def add_flags(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument(
        "--model-path",
        required=True,
        help="checkpoint folder (config.json + model.safetensors), or a hub id (owner/name) already in the "
        "local Hugging Face cache",
    )
    p.add_argument(
        "--tar-file-path",
        required=True,
        help="folder of <number>.tar shards, or one .tar file; or a store URL (s3://bucket/prefix, "
        "credentials and endpoint from the AWS_* environment)",
    )
    p.add_argument("--gpu-id", type=int, default=0, help="block index I: the tars with ids in [I*N, (I+1)*N)")
    batch, cpu_batch = _DEFAULT_BATCH_HELP[kind], _CPU_BATCH_HELP[kind]  # ScoringSettings' (a test checks)
    default = f"{batch}" if batch == cpu_batch else f"{batch}, {cpu_batch} on CPU"
    p.add_argument("--batch-size", type=int, default=None, help=f"samples per model call (default {default})")
    p.add_argument(
        "--tars-per-gpu",
        type=int,
        default=DEFAULT_TARS_PER_GPU,
        help=f"block size N in tar ids (default {DEFAULT_TARS_PER_GPU}); to score every tar in one run, give "
        "a block larger than the highest id, e.g. 1000000000",
    )
    p.add_argument(
        "--output-dir",
        default=None,
        help="where tables go, a folder or a store URL such as s3://bucket/scores (default <data "
        "root>/scores/<source>; with --output-format original: the tar folder, as the original scripts)",
    )
    p.add_argument(
        "--output-format",
        choices=("unifilter", "original"),
        default="unifilter",
        help="unifilter: <NNNNNNNN>.parquet tables the catalog reads (default); original: the original "
        "scripts' <NNNNNNNN>_quality_score.parquet (json fields + quality_score, plus key/status/reason)",
    )
    p.add_argument("--root", default=None, help="data root (default $UNIFILTER_HOME or ./.unifilter)")
    p.add_argument("--source", default=None, help="source name (default: the tar folder's name)")
    p.add_argument(
        "--device",
        default="auto",
        help="cpu | cuda | cuda:K | auto (default). With cuda/auto the GPU is --gpu-id modulo the visible GPUs",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
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
    p.add_argument(
        "--image-aspect-ratio",
        choices=("pad", "resize", "square"),
        default=None,
        help="pad images to a grey square (training) or stretch them (resize, the original scorer; square is "
        "LLaVA's name for it); default: the checkpoint's image_aspect_ratio",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="score on a Ray cluster (auto, <head>:6379 or ray://<head>:10001): one resident model per GPU "
        "(or per --ray-cpus-per-worker CPUs); tars, checkpoint and output must be reachable from every node",
    )
    p.add_argument(
        "--ray-workers", type=int, default=None, metavar="N", help="Ray actors (default: one per GPU)"
    )
    p.add_argument(
        "--ray-cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs each Ray actor reserves"
    )
    add_original_flags(p)


# the flags whose names are not the settings' field names
_FLAG_OF_SETTING = {"max_length": "--max-len"}


def _settings_error(exc: Any) -> CLIError:
    """A :class:`~unifilter_core.scoring.settings.SettingsError` worded with the CLI's flag."""
    flag = _FLAG_OF_SETTING.get(exc.field, "--" + exc.field.replace("_", "-"))
    rule = f">= {exc.low}" if exc.low is not None else exc.rule
    return CLIError(f"{flag} must be {rule}, got {exc.value}{exc.hint}")


def scoring_settings(args: argparse.Namespace, resolve: bool = False) -> Any:
    """The run's :class:`~unifilter_core.scoring.settings.ScoringSettings` from the flags (resolved for this
    machine and ``--gpu-id`` with ``resolve``)."""
    from unifilter_core.scoring.settings import ScoringSettings, SettingsError

    try:
        settings = ScoringSettings.from_values(args)
        return settings.resolve(args.kind, args.gpu_id) if resolve else settings
    except SettingsError as exc:
        raise _settings_error(exc) from None
