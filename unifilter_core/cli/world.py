"""``unifilter world``: write the embedded procedural world under the data root.

Example::

    unifilter world --root /tmp/uf --seed 0 --train-images 2500

Writes ``sources/{datacomp,obelics}/*.tar``, ``synthetic/{caption,interleaved}/``, ``pretrain/llava_pretrain/``
and ``world/{truth.parquet,world.json}`` (docs/world.md). A world whose ``world.json`` already records the same
config is left as it is unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from unifilter_core.cli import CLIError
from unifilter_core.paths import data_root

# flag -> WorldConfig field (all integers)
_SIZE_FLAGS = {
    "--seed": "seed",
    "--val-seed": "val_seed",
    "--image-size": "image_size",
    "--max-objects": "max_objects",
    "--train-images": "train_images",
    "--val-images": "val_images",
    "--train-documents": "train_documents",
    "--val-documents": "val_documents",
    "--pretrain-images": "pretrain_images",
    "--caption-tars": "caption_tars",
    "--caption-tar-samples": "caption_tar_samples",
    "--interleaved-tars": "interleaved_tars",
    "--interleaved-tar-docs": "interleaved_tar_docs",
    "--broken-per-tar": "broken_per_tar",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``world``."""
    from unifilter_core.synth.world import WorldConfig

    defaults = WorldConfig()
    p = subparsers.add_parser(
        "world",
        help="write the embedded procedural world (pairs, pretrain set, source tars, hidden levels)",
        description="Write the deterministic embedded world under the data root: synthetic pairs at 4 quality "
        "levels, an LLaVA-Pretrain-format caption set, DataComp/OBELICS-style tars and their hidden levels.",
    )
    p.add_argument("--root", default=None, help="data root (default $UNIFILTER_HOME or ./.unifilter)")
    for flag, name in _SIZE_FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument(flag, type=int, default=None, dest=name, help=f"default {default}")
    p.add_argument(
        "--force",
        action="store_true",
        help="rewrite even when world.json records the same config, and replace tars or pairs the world did not write",
    )
    p.set_defaults(func=run_world)


def build_config(args: argparse.Namespace) -> Any:
    """A ``WorldConfig`` from the flags (unset flags keep the defaults)."""
    from unifilter_core.synth.world import WorldConfig

    overrides = {
        name: getattr(args, name) for name in _SIZE_FLAGS.values() if getattr(args, name) is not None
    }
    try:
        return WorldConfig(**overrides)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc


def run_world(args: argparse.Namespace) -> int:
    from unifilter_core.synth.world import read_world_manifest, write_world

    config = build_config(args)
    root = data_root(args.root)
    manifest = read_world_manifest(root)
    same = manifest is not None and manifest["config"] == json.loads(json.dumps(config.to_dict()))
    if same and not args.force:
        print(f"world: up to date at {root} (seed {config.seed}); --force rewrites it")
        return 0
    try:
        result = write_world(root, config, overwrite=args.force)
    except (ValueError, OSError) as exc:
        raise CLIError(str(exc)) from exc
    print(_summary(root, result))
    return 0


def _summary(root: Any, result: dict[str, Any]) -> str:
    out = result["outputs"]
    tars = out["tars"]
    lines = [
        f"world: wrote {root} (seed {result['config']['seed']})",
        f"  synthetic caption pairs:     {out['caption']['train']} train + {out['caption']['val']} val",
        f"  synthetic interleaved pairs: {out['interleaved']['train']} train + {out['interleaved']['val']} val",
        f"  llava pretrain captions:     {out['pretrain']['records']}",
        f"  source tars: {len(tars['tars']['datacomp'])} datacomp ({tars['samples']['datacomp']} samples), "
        f"{len(tars['tars']['obelics'])} obelics ({tars['samples']['obelics']} documents), "
        f"{tars['broken']} broken on purpose",
        f"  hidden levels: {tars['truth']}",
        f"world: {result['pairs']} pairs in {result['seconds']:.1f} s ({result['pairs_per_s']:.0f} pairs/s)",
    ]
    return "\n".join(lines)
