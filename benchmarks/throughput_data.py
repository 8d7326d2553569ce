"""Synthetic inputs of ``score_throughput.py``: a DataComp-style caption tar and an OBELICS-style document tar
with random JPEGs of varied size and texts of varied length (deterministic for a seed)."""

from __future__ import annotations

import base64
import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = [
    "a",
    "the",
    "photo",
    "of",
    "red",
    "green",
    "blue",
    "yellow",
    "small",
    "large",
    "cube",
    "sphere",
    "cone",
    "on",
    "table",
    "in",
    "front",
    "next",
    "to",
    "dog",
    "cat",
    "running",
    "sleeping",
    "garden",
    "kitchen",
    "street",
    "picture",
    "shows",
    "image",
    "page",
    "chapter",
    "and",
    "with",
    "without",
    "this",
    "is",
    "an",
    "example",
    "two",
    "three",
    "four",
    "bright",
    "dark",
    "wooden",
    "metal",
    "old",
    "new",
    "near",
    "far",
    "left",
    "right",
    "top",
    "bottom",
    "under",
    "over",
    "beside",
]


# ------------------------------------------------------------------------------------------------ data
def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _jpeg(rng: random.Random, low: int, high: int) -> bytes:
    w, h = rng.randint(low, high), rng.randint(low, high)
    base = np.linspace(0, 255, w * h * 3, dtype=np.float32).reshape(h, w, 3)
    noise = np.asarray(
        np.random.default_rng(rng.randint(0, 2**31)).integers(0, 64, (h, w, 3)), dtype=np.float32
    )
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_caption_tar(path: Path, n: int, seed: int, repeat: int = 1) -> list[str]:
    """``n`` distinct captions (each written ``repeat`` times under new keys); returns the texts."""
    rng = random.Random(seed)
    samples = [(_jpeg(rng, 96, 320), _text(rng, 4, 40)) for _ in range(n)]
    with tarfile.open(path, "w") as tar:
        for r in range(repeat):
            for i, (image, text) in enumerate(samples):
                key = f"{r:03d}{i:06d}"
                meta = {"uid": key, "url": f"http://example.com/{key}.jpg", "caption": text, "key": key}
                _add(tar, f"{key}.jpg", image)
                _add(tar, f"{key}.txt", text.encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
    return [text for _, text in samples]


def write_document_tar(path: Path, n: int, seed: int) -> list[str]:
    """OBELICS-style documents: 1-4 images, 1-6 paragraphs of 10-250 words (very uneven lengths)."""
    rng = random.Random(seed)
    texts_out = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            texts: list[str | None] = []
            info: list[dict[str, str] | None] = []
            n_images, n_paragraphs = rng.randint(1, 4), rng.randint(1, 6)
            slots = ["img"] * n_images + ["txt"] * n_paragraphs
            rng.shuffle(slots)
            for slot in slots:
                if slot == "img":
                    texts.append(None)
                    info.append({"image_base64": base64.b64encode(_jpeg(rng, 96, 320)).decode()})
                else:
                    texts.append(_text(rng, 10, 250))
                    info.append(None)
                    texts_out.append(texts[-1])
            _add(tar, f"doc{i:06d}.json", json.dumps({"texts": texts, "image_info": info}).encode())
    return texts_out
