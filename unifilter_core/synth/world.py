"""The embedded world: deterministic writers for every artefact the demo needs.

* :func:`write_llava_pretrain`: an LLaVA-Pretrain-format caption set (stage 1).
* :func:`write_synthetic_pairs`: caption or interleaved pairs at 4 levels in UniFilter training JSON (stage 2).
* :func:`write_world_tars`: DataComp-style caption tars and OBELICS-style interleaved tars with a few broken
  samples, and the hidden true level of every sample in a sidecar parquet outside the sources folder.
* :func:`write_world`: all of the above under the data-root layout, plus ``world/world.json``.

Every item is drawn from its own ``random.Random`` seeded by (seed, stream, index), so the same config writes the
same bytes, and growing one size does not change the items already there. Files are written to a temporary name
and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from unifilter_core import paths
from unifilter_core.fileio import atomic_write_bytes
from unifilter_core.records import SAMPLE_KINDS
from unifilter_core.synth.levels import make_caption, make_document, sample_style
from unifilter_core.synth.pairs_folder import WORLD_MARKER, holds_world_pairs, refuse_claude_folder
from unifilter_core.synth.world_config import (  # re-exported: callers import them from here
    WorldConfig,
    dealt_levels,
    draw_image,
    item_rng,
)
from unifilter_core.synth.world_config import level_counts as level_counts  # re-exported (tests)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PRETRAIN_JSON = "blip_laion_cc_sbu_558k.json"
_PRETRAIN_PROMPTS = (
    "Describe the image concisely.",
    "Give a brief description of the image.",
    "Write a short caption for the picture.",
    "Summarize the visual content of the image.",
    "What is shown in this image?",
)


def dump_records(records: list[dict[str, Any]]) -> bytes:
    """A JSON list with one record per line (deterministic, diff-friendly)."""
    lines = ",\n".join(json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records)
    return (f"[\n{lines}\n]\n" if records else "[]\n").encode()


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ----------------------------------------------------------------------------------------------- LLaVA pretrain
def write_llava_pretrain(root_dir: str | os.PathLike[str], config: WorldConfig) -> dict[str, Any]:
    """Write ``blip_laion_cc_sbu_558k.json`` and ``images/`` (level-3 captions) under ``root_dir``.

    Records: ``{"id", "image" (relative to images/), "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": caption}]}``.
    """
    root = Path(root_dir)
    images = _fresh_dir(root / "images")
    records = []
    for i in range(config.pretrain_images):
        rng = item_rng(config.seed, "pretrain", i)
        scene, jpeg = draw_image(rng, config)
        ident = f"{i:09d}"
        rel = f"{i // 10000:05d}/{ident}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(jpeg)
        caption = make_caption(scene, 3, rng, config.levels, max_objects=config.max_objects).text
        human = "<image>\n" + rng.choice(_PRETRAIN_PROMPTS)
        records.append(
            {
                "id": ident,
                "image": rel,
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": caption}],
            }
        )
    atomic_write_bytes(root / PRETRAIN_JSON, dump_records(records))
    return {"path": str(root), "records": len(records)}


# ---------------------------------------------------------------------------------------------- synthetic pairs
def caption_records(config: WorldConfig, split: str, images_dir: Path | None) -> list[dict[str, Any]]:
    """Caption pairs of one split; writes each image under ``images_dir/<split>/`` when given."""
    seed, n_images = config.split_seed(split), getattr(config, f"{split}_images")
    levels = dealt_levels(n_images * config.pairs_per_image, config.level_weights)
    records = []
    for i in range(n_images):
        rng = item_rng(seed, "caption", split, i)
        scene, jpeg = draw_image(rng, config)
        rel = f"{split}/c{i:06d}.jpg"
        if images_dir is not None:
            (images_dir / rel).write_bytes(jpeg)
        style = sample_style(rng)  # shared by the image's level-3 and style-matched level-1 captions
        for j in range(config.pairs_per_image):
            level = levels[i * config.pairs_per_image + j]
            text = make_caption(scene, level, rng, config.levels, max_objects=config.max_objects, style=style)
            records.append(
                {
                    "id": f"{split}-c{i:06d}-{j}",
                    "image": rel,
                    "text": "<image>\n" + text.text,
                    "label": level,
                    "variant": text.variant,
                }
            )
    return records


def document_records(config: WorldConfig, split: str, images_dir: Path | None) -> list[dict[str, Any]]:
    """Interleaved pairs of one split: blocks of ``pairs_per_image`` documents share one image set."""
    seed, n_docs = config.split_seed(split), getattr(config, f"{split}_documents")
    levels = dealt_levels(n_docs, config.level_weights)
    records: list[dict[str, Any]] = []
    for b in range(-(-n_docs // config.pairs_per_image)):
        rng = item_rng(seed, "document", split, b)
        scenes, rels = [], []
        for k in range(rng.randint(1, config.max_doc_images)):
            scene, jpeg = draw_image(rng, config)
            rel = f"{split}/d{b:06d}_{k}.jpg"
            if images_dir is not None:
                (images_dir / rel).write_bytes(jpeg)
            scenes.append(scene)
            rels.append(rel)
        style = sample_style(rng)
        for j in range(config.pairs_per_image):
            index = b * config.pairs_per_image + j
            if index >= n_docs:
                break
            doc = make_document(
                scenes, levels[index], rng, config.levels, max_objects=config.max_objects, style=style
            )
            text = "\n\n".join("<image>" if s is None else s for s in doc.slots)
            records.append(
                {
                    "id": f"{split}-d{b:06d}-{j}",
                    "image": rels,
                    "text": text,
                    "label": doc.level,
                    "variant": doc.variant,
                }
            )
    return records


def write_synthetic_pairs(kind: str, out_dir: str | os.PathLike[str], config: WorldConfig) -> dict[str, Any]:
    """Write world pairs of ``kind`` (``caption`` | ``interleaved``) as UniFilter training JSON.

    Writes ``out_dir/train.json``, ``out_dir/val.json`` (validation from ``config.effective_val_seed``), images
    under ``out_dir/images/{train,val}/`` (record paths are relative to ``out_dir/images``) and a marker
    ``world_pairs.json``. Records: ``{"id", "image": path | [paths in <image> order], "text", "label": 0..3,
    "variant"}``.

    Returns:
        A summary: record counts and level counts per split, seconds and pairs per second.
    """
    if kind not in SAMPLE_KINDS:
        raise ValueError(f"kind must be 'caption' or 'interleaved', got {kind!r}")
    out = Path(out_dir)
    refuse_claude_folder(out)  # never write over paid-for pairs (synth.pairs_folder)
    start = time.perf_counter()
    images_dir = _fresh_dir(out / "images")
    build = caption_records if kind == "caption" else document_records
    summary: dict[str, Any] = {"backend": "world", "kind": kind, "seed": config.seed}
    for split in ("train", "val"):
        (images_dir / split).mkdir()
        records = build(config, split, images_dir)
        atomic_write_bytes(out / f"{split}.json", dump_records(records))
        summary[split] = len(records)
        summary[f"{split}_levels"] = {
            str(k): v for k, v in sorted(Counter(r["label"] for r in records).items())
        }
    atomic_write_bytes(out / WORLD_MARKER, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    seconds = time.perf_counter() - start
    n = summary["train"] + summary["val"]
    summary.update(
        path=str(out), seconds=round(seconds, 3), pairs_per_s=round(n / seconds, 1) if seconds > 0 else None
    )
    logger.info("world %s pairs: %d train, %d val in %.1f s", kind, summary["train"], summary["val"], seconds)
    return summary


# ------------------------------------------------------------------------------------------------- whole world
def world_dir(root: str | os.PathLike[str]) -> Path:
    """``<root>/world``: the world's manifest and truth sidecar (outside ``sources/``)."""
    return Path(root) / "world"


def read_world_manifest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``world/world.json`` manifest under ``root``, or None when no world was written there."""
    path = world_dir(root) / "world.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _check_ownership(root: Path, overwrite: bool) -> list[str]:
    """Tars of a previous world (to replace), or raise if the outputs hold data the world did not write."""
    manifest = read_world_manifest(root)
    if manifest is not None:
        return [str(root / t) for tars in manifest["outputs"]["tars"]["tars"].values() for t in tars]
    if overwrite:
        return []
    from unifilter_core.synth.tars import CAPTION_SOURCE, INTERLEAVED_SOURCE

    foreign = [
        p
        for s in (CAPTION_SOURCE, INTERLEAVED_SOURCE)
        for p in sorted((paths.sources_dir(root) / s).glob("*.tar"))
    ]
    foreign += [
        paths.synthetic_dir(root, k) / "train.json"
        for k in SAMPLE_KINDS
        if (paths.synthetic_dir(root, k) / "train.json").exists()
        and not holds_world_pairs(paths.synthetic_dir(root, k))
    ]
    if foreign:
        raise ValueError(
            f"{root} already holds data the world generator did not write (e.g. {foreign[0]}); "
            "use another data root, or overwrite=True (CLI: --force) to replace it"
        )
    return []


def _relative(path: str, root: Path) -> str:
    return Path(path).resolve().relative_to(root).as_posix()


def write_world(
    root: str | os.PathLike[str], config: WorldConfig, *, overwrite: bool = False
) -> dict[str, Any]:
    """Write the whole embedded world under the data root ``root``.

    Layout: ``sources/datacomp/*.tar``, ``sources/obelics/*.tar``, ``synthetic/{caption,interleaved}/``,
    ``pretrain/llava_pretrain/``, ``world/truth.parquet`` and ``world/world.json`` (the config and the outputs).
    Tars of a previous world under ``root`` that the new config does not produce are removed.

    Args:
        root: the data root.
        config: the world's sizes and seed.
        overwrite: replace tars or synthetic pairs that the world generator did not write (off by default, so
            Claude-generated pairs are never clobbered by accident).

    Returns:
        The manifest written to ``world.json`` plus ``seconds`` and ``pairs_per_s`` (pairs = synthetic caption and
        interleaved records, LLaVA-Pretrain records and tar samples).
    """
    from unifilter_core.synth.tars import write_world_tars

    root = Path(root).resolve()
    previous_tars = _check_ownership(root, overwrite)
    start = time.perf_counter()
    outputs: dict[str, Any] = {
        "pretrain": write_llava_pretrain(paths.pretrain_dir(root), config),
        "caption": write_synthetic_pairs("caption", paths.synthetic_dir(root, "caption"), config),
        "interleaved": write_synthetic_pairs("interleaved", paths.synthetic_dir(root, "interleaved"), config),
        "tars": write_world_tars(paths.sources_dir(root), config, world_dir(root) / "truth.parquet"),
    }
    current = {t for tars in outputs["tars"]["tars"].values() for t in tars}
    for stale in sorted(set(previous_tars) - current):
        Path(stale).unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    n_pairs = outputs["pretrain"]["records"] + sum(outputs["tars"]["samples"].values())
    n_pairs += sum(outputs[k]["train"] + outputs[k]["val"] for k in SAMPLE_KINDS)
    for part in outputs.values():  # world.json is deterministic: no timings, paths relative to the root
        for name in ("seconds", "pairs_per_s"):
            part.pop(name, None)
        for name in ("path", "truth"):
            if name in part:
                part[name] = _relative(part[name], root)
    for source, tars in outputs["tars"]["tars"].items():
        outputs["tars"]["tars"][source] = [_relative(t, root) for t in tars]
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "outputs": outputs,
        "pairs": n_pairs,
    }
    atomic_write_bytes(
        world_dir(root) / "world.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    )
    logger.info("world written under %s: %d pairs in %.1f s", root, n_pairs, seconds)
    return {**manifest, "seconds": round(seconds, 3), "pairs_per_s": round(n_pairs / seconds, 1)}
