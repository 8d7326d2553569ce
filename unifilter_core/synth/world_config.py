"""The world's configuration and the per-item draws every world writer shares.

:class:`WorldConfig` (sizes and knobs), :func:`item_rng` (one seeded random source per item), :func:`draw_image`
and the exact level mixes (:func:`level_counts`, :func:`dealt_levels`). A module of its own so that
:mod:`unifilter_core.synth.tars` and :mod:`unifilter_core.synth.world` (which calls the tar writer) both import
it without importing each other; :mod:`unifilter_core.synth.world` re-exports every name.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

from unifilter_core.synth.levels import LEVELS, LevelConfig
from unifilter_core.synth.scenes import Scene, encode_jpeg, render_scene, sample_scene


@dataclass
class WorldConfig:
    """Sizes and knobs of the embedded world. Defaults: a tiny model trains in minutes on 2 CPU cores."""

    seed: int = 0
    val_seed: int | None = None  # validation splits are drawn from this seed (default: seed + 1)
    # scenes and images
    # 63 px = the 3 x 3 grid of 21 px cells; the "world" model preset's tower has 21 px patches, one per cell
    image_size: int = 63
    max_objects: int = 3  # 1..max_objects objects per scene
    duplicate_prob: float = 0.3  # chance an object repeats an earlier one's look (counts in captions)
    supersample: int = 2  # anti-aliasing factor of the renderer
    jpeg_quality: int = 90
    # synthetic caption pairs (UniFilter training JSON); each image gets pairs_per_image texts at dealt levels
    # (10,000 train images grade better than 2,500 at equal stage-2 steps: docs/training.md)
    train_images: int = 10000
    val_images: int = 500
    pairs_per_image: int = 4
    level_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # share of levels 0..3 in synthetic pairs
    # synthetic interleaved pairs: documents share image sets in blocks of pairs_per_image
    train_documents: int = 4000  # 1000 image sets x 4 levels (docs/training.md: documents, run Y)
    val_documents: int = 200
    max_doc_images: int = 3  # 1..max_doc_images images per document
    # LLaVA-Pretrain-format caption set (stage 1's image grounding: 10,000 grounds far better than 2,500 at
    # equal steps, docs/training.md)
    pretrain_images: int = 10000
    # source tars
    caption_tars: int = 2
    caption_tar_samples: int = 500
    interleaved_tars: int = 2
    interleaved_tar_docs: int = 100
    tar_level_weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)  # share of levels 0..3 in the tars
    broken_per_tar: int = 3  # broken samples per tar (cycling through the broken kinds)
    separate_image_fraction: float = 0.2  # interleaved docs whose images are tar members, not base64
    levels: LevelConfig = field(default_factory=LevelConfig)

    def __post_init__(self) -> None:
        self.level_weights = tuple(float(w) for w in self.level_weights)
        self.tar_level_weights = tuple(float(w) for w in self.tar_level_weights)
        if isinstance(self.levels, dict):
            self.levels = LevelConfig(**self.levels)
        sizes = ("train_images", "val_images", "train_documents", "val_documents", "pretrain_images")
        sizes += (
            "caption_tars",
            "caption_tar_samples",
            "interleaved_tars",
            "interleaved_tar_docs",
            "broken_per_tar",
        )
        for name in sizes:
            if getattr(self, name) < 0:
                raise ValueError(f"WorldConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("level_weights", "tar_level_weights"):
            w = getattr(self, name)
            if len(w) != len(LEVELS) or min(w) < 0 or sum(w) <= 0:
                raise ValueError(f"WorldConfig.{name} needs 4 non-negative weights (levels 0..3), got {w}")
        if self.image_size < 16 or self.supersample < 1 or not 1 <= self.jpeg_quality <= 95:
            raise ValueError("image_size must be >= 16, supersample >= 1, jpeg_quality in 1..95")
        if not 1 <= self.max_objects <= 9 or self.max_doc_images < 1 or self.pairs_per_image < 1:
            raise ValueError("max_objects must be in 1..9, max_doc_images >= 1 and pairs_per_image >= 1")
        for name in ("duplicate_prob", "separate_image_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def effective_val_seed(self) -> int:
        return self.seed + 1 if self.val_seed is None else self.val_seed

    def split_seed(self, split: str) -> int:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.seed if split == "train" else self.effective_val_seed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorldConfig:
        return cls(**data)


# --------------------------------------------------------------------------------------------------- helpers
def item_rng(seed: int, *parts: object) -> random.Random:
    """The random source of one item: seeded by a string of (seed, stream, index, ...), stable across runs."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def draw_image(rng: random.Random, config: WorldConfig) -> tuple[Scene, bytes]:
    """A random scene and its JPEG bytes."""
    scene = sample_scene(rng, config.max_objects, config.duplicate_prob)
    image = render_scene(scene, rng, config.image_size, config.supersample)
    return scene, encode_jpeg(image, config.jpeg_quality)


def level_counts(n: int, weights: tuple[float, ...]) -> list[int]:
    """Exact per-level counts for ``n`` items (largest remainder)."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    counts = [int(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda k: (counts[k] - raw[k], k))
    for k in order[: n - sum(counts)]:
        counts[k] += 1
    return counts


def dealt_levels(n: int, weights: tuple[float, ...]) -> list[int]:
    """``n`` levels in exact proportions, dealt round-robin (uniform weights: every block of 4 holds 0..3)."""
    left = level_counts(n, weights)
    out: list[int] = []
    while len(out) < n:
        for level in LEVELS:
            if left[level] > 0:
                out.append(level)
                left[level] -= 1
    return out
