"""Vision pre-training of the embedded world's tower: the world's stand-in for a pretrained SigLIP.

The released UniFilter starts from a pretrained SigLIP and never trains it (reference-model.md). The world's
tiny tower has no pretrained weights, and training it only through the caption loss of stage 1 fails: the
captioning model learns the background (every image token carries it) but never the objects' colours, shapes
or sizes, and the tower's random features lose their colour content along the way (docs/training.md,
"Why the world's tower is pre-trained"). This module gives the tower what pre-training gives SigLIP: features in
which the objects are plainly visible. It trains the tower with small throw-away heads on scenes whose truth is
known, then the tower stays frozen in both stages, as in the published recipe.

Targets, from each scene's structured truth (``synth.scenes.Scene``):

* per grid cell (the tower's patch grid average-pooled to the world's 3 x 3 grid): what occupies it (empty or
  one of the shapes), its colour and size (only where an object is), and the cell's own index (so the features
  say *where* they are: the language model's rotary positions alone do not tell it which image vector is which
  cell);
* per image (mean of all patches): background tone and texture.

The heads are discarded; only the tower's weights change. About 20 s for 10,000 scenes x 10 epochs on one CPU
core with the world preset's 3 x 3 patches of 21 px.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from unifilter_core.cpus import resolve_threads
from unifilter_core.synth.scenes import COLOURS, POSITIONS, SHAPES, TEXTURES, TONES

logger = logging.getLogger(__name__)

IGNORE = -100
GRID = 3  # the world's 3 x 3 cell grid (synth.scenes.POSITIONS)
MIN_IMAGES = 1000  # small worlds (tests, the quick demo) still give the tower enough scenes to see objects


@dataclass
class VisionPretrainConfig:
    """Size and optimiser of the world tower's pre-training."""

    # training scenes, drawn from the world's generator (stream "vision"); None: as many as the world's
    # LLaVA-Pretrain set has images (10,000 by default), at least MIN_IMAGES
    images: int | None = None
    # held-out scenes for the reported accuracies; None: a tenth of images, 100..1000
    eval_images: int | None = None
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.05
    seed: int = 0
    torch_threads: int | str = "auto"  # "auto": the cores idle when it starts (unifilter_core.cpus.idle_cpus)

    def __post_init__(self) -> None:
        if self.torch_threads != "auto":
            resolve_threads(self.torch_threads)  # raises on a bad value
        for name in ("images", "eval_images", "epochs", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"VisionPretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0 or not 0 <= self.warmup_fraction < 1:
            raise ValueError("learning_rate must be > 0 and warmup_fraction in [0, 1)")


@dataclass
class SceneBatch:
    """Preprocessed images and their targets (``[N, 9]`` per cell, ``[N]`` per image)."""

    pixels: torch.Tensor
    occupant: torch.Tensor  # 0 = empty, 1 + shape index
    colour: torch.Tensor  # IGNORE where empty
    size: torch.Tensor  # IGNORE where empty
    tone: torch.Tensor
    texture: torch.Tensor

    def select(self, index: torch.Tensor) -> SceneBatch:
        return SceneBatch(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def __len__(self) -> int:
        return self.pixels.shape[0]


def scene_targets(scenes: list[Any]) -> dict[str, torch.Tensor]:
    """Integer targets of ``synth.scenes.Scene`` objects (cells in ``POSITIONS`` order)."""
    colours, tones = list(COLOURS), list(TONES)
    n = len(scenes)
    occupant = torch.zeros(n, len(POSITIONS), dtype=torch.long)
    colour = torch.full((n, len(POSITIONS)), IGNORE, dtype=torch.long)
    size = torch.full((n, len(POSITIONS)), IGNORE, dtype=torch.long)
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            cell = POSITIONS.index(obj.position)
            occupant[row, cell] = 1 + SHAPES.index(obj.shape)
            colour[row, cell] = colours.index(obj.colour)
            size[row, cell] = int(obj.size == "large")
    tone = torch.tensor([tones.index(s.background.tone) for s in scenes], dtype=torch.long)
    texture = torch.tensor([TEXTURES.index(s.background.texture) for s in scenes], dtype=torch.long)
    return {"occupant": occupant, "colour": colour, "size": size, "tone": tone, "texture": texture}


def world_scene_batch(world: Any, n: int, stream: str, processor: Any) -> SceneBatch:
    """``n`` scenes of the world's generator (``synth.world.draw_image``: same renderer, size and JPEG quality as
    the world's data), decoded and preprocessed exactly as the trainers and the scorer do."""
    from PIL import Image

    from unifilter_core.synth.world import draw_image, item_rng

    scenes, pixels = [], []
    for i in range(n):
        scene, jpeg = draw_image(item_rng(world.seed, stream, i), world)
        scenes.append(scene)
        pixels.append(processor.preprocess_image(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    return SceneBatch(pixels=torch.stack(pixels), **scene_targets(scenes))


class SceneHeads(nn.Module):
    """Throw-away linear heads on the tower's features (see the module docstring)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.occupant = nn.Linear(hidden, 1 + len(SHAPES))
        self.colour = nn.Linear(hidden, len(COLOURS))
        self.size = nn.Linear(hidden, 2)
        self.cell = nn.Linear(hidden, len(POSITIONS))
        self.tone = nn.Linear(hidden, len(TONES))
        self.texture = nn.Linear(hidden, len(TEXTURES))


def tower_features(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cells [N, 9, C], image [N, C])``: the tower features the model uses (``vision_features``) pooled to the
    3 x 3 grid, and their mean over all patches."""
    hidden = model.vision_features(pixels)  # (N, P, C)
    n, p, c = hidden.shape
    side = math.isqrt(p)
    maps = hidden.transpose(1, 2).reshape(n, c, side, side)
    cells = F.adaptive_avg_pool2d(maps, GRID).flatten(2).transpose(1, 2)
    return cells, hidden.mean(dim=1)


def _losses(model: nn.Module, heads: SceneHeads, batch: SceneBatch) -> dict[str, torch.Tensor]:
    cells, image = tower_features(model, batch.pixels)
    n = cells.shape[0]
    cell_ids = torch.arange(GRID * GRID).expand(n, -1)
    return {
        "occupant": F.cross_entropy(heads.occupant(cells).flatten(0, 1), batch.occupant.flatten()),
        "colour": F.cross_entropy(
            heads.colour(cells).flatten(0, 1), batch.colour.flatten(), ignore_index=IGNORE
        ),
        "size": F.cross_entropy(heads.size(cells).flatten(0, 1), batch.size.flatten(), ignore_index=IGNORE),
        "cell": F.cross_entropy(heads.cell(cells).flatten(0, 1), cell_ids.flatten()),
        "tone": F.cross_entropy(heads.tone(image), batch.tone),
        "texture": F.cross_entropy(heads.texture(image), batch.texture),
    }


@torch.no_grad()
def scene_accuracy(
    model: nn.Module, heads: SceneHeads, batch: SceneBatch, chunk: int = 256
) -> dict[str, float]:
    """Accuracy of every head on ``batch``: ``occupant`` over all cells (most are empty), ``shape`` (the same
    head) and ``colour`` / ``size`` over the cells that hold an object."""
    names = ("occupant", "shape", "colour", "size", "cell", "tone", "texture")
    hits: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for start in range(0, len(batch), chunk):
        part = batch.select(torch.arange(start, min(start + chunk, len(batch))))
        cells, image = tower_features(model, part.pixels)
        cell_ids = torch.arange(GRID * GRID).expand(cells.shape[0], -1)
        occupant = heads.occupant(cells)
        for name, logits, target in (
            ("occupant", occupant, part.occupant),
            ("shape", occupant, torch.where(part.occupant > 0, part.occupant, IGNORE)),
            ("colour", heads.colour(cells), part.colour),
            ("size", heads.size(cells), part.size),
            ("cell", heads.cell(cells), cell_ids),
            ("tone", heads.tone(image), part.tone),
            ("texture", heads.texture(image), part.texture),
        ):
            valid = target != IGNORE
            hits[name].append((logits.argmax(-1) == target)[valid])
    return {k: float(torch.cat(v).float().mean()) for k, v in hits.items()}


def pretrain_world_tower(
    model: Any, processor: Any, world: Any, config: VisionPretrainConfig | None = None
) -> dict:
    """Pre-train ``model``'s vision tower in place on world scenes; returns accuracies, losses and timing.

    Args:
        model: a ``UniFilterForQualityScoring`` (only ``model.model.vision_tower`` changes).
        processor: the checkpoint's ``UniFilterProcessor`` (images preprocessed as everywhere else).
        world: the ``synth.WorldConfig`` whose generator draws the scenes (seed, image size, JPEG quality).
        config: sizes and optimiser (defaults: :class:`VisionPretrainConfig`).
    """
    config = config or VisionPretrainConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(config.torch_threads))
    try:
        return _pretrain(model, processor, world, config)
    finally:
        torch.set_num_threads(threads)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _pretrain(model: Any, processor: Any, world: Any, config: VisionPretrainConfig) -> dict:
    start = time.perf_counter()
    tower = model.model.vision_tower
    n_train = config.images or max(int(world.pretrain_images), MIN_IMAGES)
    n_eval = config.eval_images or min(1000, max(100, n_train // 10))
    train = world_scene_batch(world, n_train, f"vision-{config.seed}", processor)
    held_out = world_scene_batch(world, n_eval, f"vision-eval-{config.seed}", processor)
    data_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng():  # the heads' initial weights depend on the seed only, not on global state
        torch.manual_seed(config.seed)
        heads = SceneHeads(model.config.vision_config.hidden_size)
    was_training = tower.training
    trainable = [p.requires_grad for p in tower.parameters()]
    tower.train()
    for p in tower.parameters():
        p.requires_grad_(True)
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    steps_per_epoch = max(1, len(train) // config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(config.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
    history = []
    for epoch in range(config.epochs):
        order = torch.randperm(len(train), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            batch = train.select(order[step * config.batch_size : (step + 1) * config.batch_size])
            loss = sum(_losses(model, heads, batch).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch})
        logger.info(
            "world tower pre-training epoch %d/%d: loss %.4f", epoch + 1, config.epochs, history[-1]["loss"]
        )
    tower.train(was_training)
    for p, flag in zip(tower.parameters(), trainable, strict=True):
        p.requires_grad_(flag)
    accuracy = scene_accuracy(model, heads, held_out)
    result = {
        "config": {**asdict(config), "images": n_train, "eval_images": n_eval},
        "held_out_accuracy": accuracy,
        "history": history,
        "data_seconds": data_seconds,
        "wall_seconds": time.perf_counter() - start,
    }
    logger.info("world tower pre-trained in %.1f s: held-out accuracy %s", result["wall_seconds"], accuracy)
    return result
