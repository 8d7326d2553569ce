"""``unifilter train stage1|stage2 --config FILE|PRESET [--set key=value ...] [--resume]``.

Runs the same way under ``torchrun`` / ``deepspeed`` launchers (``python -m unifilter_core.cli train ...``
as the launched program); the DeepSpeed config is an option of the config (``deepspeed: zero2|zero3|PATH``).
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the stage-1 projector or the stage-2 quality classifier",
        description="Train with a preset (released, world) or a JSON config; override any field with --set.",
    )
    parser.add_argument("stage", choices=("stage1", "stage2"), help="which training stage to run")
    parser.add_argument(
        "--config",
        required=True,
        help="a preset name (released, world) or a JSON file (two-stage or one stage)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (JSON values: 1e-4, true, null, [..]); repeatable",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue from the newest checkpoint in OUTPUT_DIR/checkpoints (or the one given)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from unifilter_core.cli import CLIError
    from unifilter_core.training import load_config, train_stage1, train_stage2

    try:
        config = load_config(args.config, args.stage, list(args.overrides))
        config.validate()
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    train = train_stage1 if args.stage == "stage1" else train_stage2
    try:
        out = train(config, resume=args.resume)  # type: ignore[arg-type]
    except BaseException:
        _close_process_group(wait=False)  # another rank may be inside a collective: no barrier
        raise
    _close_process_group(wait=True)
    logger.info("%s finished: %s", args.stage, out)
    return 0


def _close_process_group(*, wait: bool) -> None:
    """Under torchrun / deepspeed: (after a barrier when ``wait``) tear the process group down before interpreter
    exit; left to exit, gloo's threads can abort a rank ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if wait:
                dist.barrier()
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover - `torchrun -m unifilter_core.cli.train stage2 --config ...`
    import sys

    from unifilter_core.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
