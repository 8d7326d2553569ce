"""World source tars: DataComp-style caption shards and OBELICS-style interleaved shards, with hidden levels.

Caption tar members per sample: ``<key>.jpg``, ``<key>.txt``, ``<key>.json`` (uid, url, caption, key, status,
width, height, ...). Interleaved tar members: ``<key>.json`` (``texts`` with null at image slots, ``image_info``
with null at text slots and ``{"image_base64", "src", "width", "height"}`` at image slots); a share of documents
keep their images as separate members ``<key>.<n>.jpg`` (n = slot index) with no ``image_base64``.

A few samples per tar are broken on purpose (``BROKEN_KINDS``). The true level of every sample goes to a parquet
sidecar OUTSIDE the sources folder; broken samples have a null level and name their defect in ``broken``.
Tars are byte-for-byte deterministic: sorted members, fixed mtime/uid/gid/mode, USTAR headers.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import random
import tarfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unifilter_core.fileio import atomic_file, atomic_write_bytes
from unifilter_core.paths import partition_key
from unifilter_core.synth.levels import make_caption, make_document
from unifilter_core.synth.world_config import WorldConfig, dealt_levels, draw_image, item_rng

logger = logging.getLogger(__name__)

CAPTION_SOURCE = "datacomp"
INTERLEAVED_SOURCE = "obelics"
BROKEN_KINDS = {
    "caption": ("corrupt_image", "missing_text", "broken_json"),
    "interleaved": ("broken_json", "corrupt_image", "empty_slot"),
}
_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed for every member
_URL = "https://world.unifilter.invalid"
TRUTH_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("tar", pa.string()),
        ("partition_key", pa.string()),
        ("key", pa.string()),
        ("kind", pa.string()),
        ("level", pa.int8()),
        ("variant", pa.string()),
        ("broken", pa.string()),
        ("uid", pa.string()),
        ("n_images", pa.int16()),
    ]
)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A deterministic USTAR archive of ``members`` (name -> bytes), sorted by name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), _MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))
    return buf.getvalue()


def _uid(seed: int, source: str, key: str) -> str:
    return hashlib.sha256(f"{seed}/{source}/{key}".encode()).hexdigest()[:32]


def _broken_plan(rng: random.Random, n: int, kind: str, count: int) -> dict[int, str]:
    kinds = BROKEN_KINDS[kind]
    return {i: kinds[j % len(kinds)] for j, i in enumerate(sorted(rng.sample(range(n), min(count, n))))}


def _caption_sample(
    config: WorldConfig, t: int, i: int, key: str, level: int, broken: str | None, separate: bool
) -> tuple[dict[str, bytes], dict[str, Any]]:
    del separate  # caption samples always carry their image as a member
    rng = item_rng(config.seed, CAPTION_SOURCE, t, i)
    scene, jpeg = draw_image(rng, config)
    text = make_caption(scene, level, rng, config.levels, max_objects=config.max_objects)
    uid = _uid(config.seed, CAPTION_SOURCE, key)
    size = config.image_size
    meta = {
        "uid": uid,
        "url": f"{_URL}/{CAPTION_SOURCE}/{uid}.jpg",
        "caption": text.text,
        "key": key,
        "status": "success",
        "error_message": None,
        "width": size,
        "height": size,
        "original_width": size,
        "original_height": size,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
    }
    members = {
        f"{key}.jpg": jpeg,
        f"{key}.txt": text.text.encode(),
        f"{key}.json": json.dumps(meta, sort_keys=True).encode(),
    }
    if broken == "corrupt_image":
        members[f"{key}.jpg"] = jpeg[: len(jpeg) // 4]
    elif broken == "missing_text":  # no txt member and no caption in the json
        del members[f"{key}.txt"]
        members[f"{key}.json"] = json.dumps({**meta, "caption": None}, sort_keys=True).encode()
    elif broken == "broken_json":
        members[f"{key}.json"] = members[f"{key}.json"][:-7]
    row = {"key": key, "kind": "caption", "variant": text.variant, "uid": uid, "n_images": 1}
    return members, row


def _document_sample(
    config: WorldConfig, t: int, i: int, key: str, level: int, broken: str | None, separate: bool
) -> tuple[dict[str, bytes], dict[str, Any]]:
    rng = item_rng(config.seed, INTERLEAVED_SOURCE, t, i)
    drawn = [draw_image(rng, config) for _ in range(rng.randint(1, config.max_doc_images))]
    doc = make_document([s for s, _ in drawn], level, rng, config.levels, max_objects=config.max_objects)
    uid = _uid(config.seed, INTERLEAVED_SOURCE, key)
    members: dict[str, bytes] = {}
    image_info: list[dict[str, Any] | None] = []
    jpegs = iter(j for _, j in drawn)
    for n, slot in enumerate(doc.slots):
        if slot is not None:
            image_info.append(None)
            continue
        jpeg = next(jpegs)
        info: dict[str, Any] = {
            "src": f"{_URL}/{INTERLEAVED_SOURCE}/{uid}/{n}.jpg",
            "width": config.image_size,
        }
        info["height"] = config.image_size
        if separate:
            members[f"{key}.{n}.jpg"] = jpeg
        else:
            info["image_base64"] = base64.b64encode(jpeg).decode()
        image_info.append(info)
    texts = list(doc.slots)
    first_image = next(n for n, s in enumerate(texts) if s is None)
    if broken == "corrupt_image":
        garbage = b"\xff\xd8\xff\xe0 not a jpeg"
        if separate:
            members[f"{key}.{first_image}.jpg"] = garbage
        else:
            image_info[first_image]["image_base64"] = base64.b64encode(garbage).decode()  # type: ignore[index]
    elif broken == "empty_slot":
        image_info[first_image] = None  # a slot with neither text nor image
        members.pop(f"{key}.{first_image}.jpg", None)
    record = {"key": key, "uid": uid, "url": f"{_URL}/{INTERLEAVED_SOURCE}/{uid}", "texts": texts}
    record["image_info"] = image_info
    payload = json.dumps(record, sort_keys=True).encode()
    members[f"{key}.json"] = payload[: len(payload) // 2] if broken == "broken_json" else payload
    row = {"key": key, "kind": "interleaved", "variant": doc.variant, "uid": uid, "n_images": len(drawn)}
    return members, row


def _write_source(
    sources_dir: Path, kind: str, config: WorldConfig
) -> tuple[list[dict[str, Any]], list[str]]:
    source = CAPTION_SOURCE if kind == "caption" else INTERLEAVED_SOURCE
    n_tars = config.caption_tars if kind == "caption" else config.interleaved_tars
    n = config.caption_tar_samples if kind == "caption" else config.interleaved_tar_docs
    build = _caption_sample if kind == "caption" else _document_sample
    width = max(4, len(str(max(n - 1, 0))))
    rows: list[dict[str, Any]] = []
    written = []
    for t in range(n_tars):
        rng = item_rng(config.seed, source, "tar", t)
        levels = dealt_levels(n, config.tar_level_weights)
        rng.shuffle(levels)
        broken_plan = _broken_plan(rng, n, kind, config.broken_per_tar)
        separate = set(rng.sample(range(n), round(n * config.separate_image_fraction)))
        path = sources_dir / source / f"{t:08d}.tar"
        members: dict[str, bytes] = {}
        for i in range(n):
            key = f"{t:05d}{i:0{width}d}"
            broken = broken_plan.get(i)
            sample_members, row = build(config, t, i, key, levels[i], broken, i in separate)
            members.update(sample_members)
            row.update(level=None if broken else levels[i], broken=broken)
            row.update(source=source, tar=f"{sources_dir.name}/{source}/{path.name}")
            row["partition_key"] = partition_key(source, path)
            rows.append(row)
        atomic_write_bytes(path, tar_bytes(members))
        written.append(str(path))
    return rows, written


def write_world_tars(
    sources_dir: str | os.PathLike[str], config: WorldConfig, truth_path: str | os.PathLike[str]
) -> dict[str, Any]:
    """Write ``sources_dir/datacomp/NNNNNNNN.tar`` and ``sources_dir/obelics/NNNNNNNN.tar`` and the truth sidecar.

    Args:
        sources_dir: the sources folder (``<root>/sources``).
        config: sizes, level mix of the tars (``tar_level_weights``) and broken samples per tar.
        truth_path: the parquet sidecar (columns of ``TRUTH_SCHEMA``); must lie outside ``sources_dir``.

    Returns:
        A summary: the tar paths per source, sample counts, broken counts and seconds.
    """
    sources, truth = Path(sources_dir).resolve(), Path(truth_path).resolve()
    if truth.is_relative_to(sources):
        raise ValueError(f"truth sidecar {truth} must lie outside the sources folder {sources}")
    start = time.perf_counter()
    caption_rows, caption_tars = _write_source(sources, "caption", config)
    doc_rows, doc_tars = _write_source(sources, "interleaved", config)
    rows = caption_rows + doc_rows
    table = pa.Table.from_pylist(rows, schema=TRUTH_SCHEMA)
    truth.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(truth) as handle:
        pq.write_table(table, handle)
    seconds = time.perf_counter() - start
    summary = {
        "tars": {CAPTION_SOURCE: caption_tars, INTERLEAVED_SOURCE: doc_tars},
        "samples": {CAPTION_SOURCE: len(caption_rows), INTERLEAVED_SOURCE: len(doc_rows)},
        "broken": sum(r["broken"] is not None for r in rows),
        "truth": str(truth),
        "seconds": round(seconds, 3),
    }
    logger.info(
        "world tars: %d caption + %d interleaved samples in %.1f s", len(caption_rows), len(doc_rows), seconds
    )
    return summary
