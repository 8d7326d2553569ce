"""Procedural scenes with known contents, rendered with PIL on the CPU.

A :class:`Scene` is the structured truth of one image: 1-3 objects (shape, colour, size, cell of a 3x3 grid) on a
background (tone and texture). Everything is drawn from an explicit ``random.Random``, so the same seed gives the
same scene and the same pixels. :func:`fact_distance` counts how many facts two scenes disagree on; the level
generator uses it to make wrong captions unambiguously wrong.
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 200),
    "brown": (125, 75, 35),
}
SIZES: tuple[str, ...] = ("small", "large")
# 3x3 grid, row-major: the name is the key used in scene descriptions
POSITIONS: tuple[str, ...] = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
TONES: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (150, 150, 150),
    "black": (25, 25, 25),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted")

# half-extent of an object as a fraction of a grid cell, and the jitter of its centre
_HALF_EXTENT = {"small": 0.24, "large": 0.42}
_JITTER = 0.07


@dataclass(frozen=True, slots=True)
class SceneObject:
    """One drawn object: its shape, colour name, size name and grid position name."""

    shape: str
    colour: str
    size: str
    position: str

    def appearance(self) -> tuple[str, str, str]:
        """(shape, colour, size): objects with equal appearance are counted together in captions."""
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True, slots=True)
class Background:
    """The background: a tone (white, grey, black) and a texture (plain, striped, checkered, dotted)."""

    tone: str
    texture: str


@dataclass(frozen=True, slots=True)
class Scene:
    """The structured truth of one image. Objects occupy distinct grid cells."""

    objects: tuple[SceneObject, ...]
    background: Background

    def to_dict(self) -> dict:
        """A JSON-ready description (used in sidecars and for debugging)."""
        return {
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position}
                for o in self.objects
            ],
            "background": {"tone": self.background.tone, "texture": self.background.texture},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        """The inverse of :meth:`to_dict`."""
        objects = tuple(SceneObject(**o) for o in data["objects"])
        return cls(objects=objects, background=Background(**data["background"]))


def sample_scene(rng: random.Random, max_objects: int = 3, duplicate_prob: float = 0.3) -> Scene:
    """Draw a random scene.

    Args:
        rng: the random source (seeded by the caller).
        max_objects: the scene holds 1..max_objects objects (at most 9, one per grid cell).
        duplicate_prob: chance that an object after the first repeats an earlier object's appearance, so that
            captions contain counts ("two small red circles").
    """
    if not 1 <= max_objects <= len(POSITIONS):
        raise ValueError(f"max_objects must be in 1..{len(POSITIONS)}, got {max_objects}")
    n = rng.randint(1, max_objects)
    cells = rng.sample(POSITIONS, n)
    objects: list[SceneObject] = []
    for cell in cells:
        if objects and rng.random() < duplicate_prob:
            shape, colour, size = rng.choice(objects).appearance()
        else:
            shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES)
        objects.append(SceneObject(shape, colour, size, cell))
    background = Background(rng.choice(list(TONES)), rng.choice(TEXTURES))
    return Scene(tuple(objects), background)


def fact_distance(a: Scene, b: Scene) -> int:
    """How many facts two scenes disagree on.

    Objects are matched one-to-one so as to minimise mismatched attributes (shape, colour, size, position: one
    fact each); every object without a partner is one fact (a count); a different background tone or texture is
    one fact each.
    """
    small, large = sorted((a.objects, b.objects), key=len)
    best = len(large) * 4
    for perm in itertools.permutations(large, len(small)):
        cost = sum(_attribute_mismatches(x, y) for x, y in zip(small, perm, strict=True))
        best = min(best, cost)
    objects = best + (len(large) - len(small))
    background = int(a.background.tone != b.background.tone) + int(
        a.background.texture != b.background.texture
    )
    return objects + background


def _attribute_mismatches(x: SceneObject, y: SceneObject) -> int:
    return sum(
        p != q
        for p, q in zip(
            (x.shape, x.colour, x.size, x.position), (y.shape, y.colour, y.size, y.position), strict=True
        )
    )


def render_scene(scene: Scene, rng: random.Random, size: int = 64, supersample: int = 2) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels.

    Args:
        scene: what to draw.
        rng: the random source for the small placement jitter (seeded by the caller).
        size: the output side in pixels.
        supersample: draw at ``size * supersample`` and average blocks down to ``size`` (anti-aliasing).
    """
    if size < 16:
        raise ValueError(f"image size must be at least 16 px, got {size}")
    side = size * supersample
    image = Image.new("RGB", (side, side), TONES[scene.background.tone])
    draw = ImageDraw.Draw(image)
    _draw_texture(draw, scene.background, side, supersample)
    cell = side / 3
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        cx = (col + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        cy = (row + 0.5 + rng.uniform(-_JITTER, _JITTER)) * cell
        _draw_shape(draw, obj.shape, cx, cy, _HALF_EXTENT[obj.size] * cell, COLOURS[obj.colour])
    if supersample > 1:
        image = image.reduce(supersample)  # box average of supersample x supersample blocks
    return image


def _texture_colour(tone: str) -> tuple[int, int, int]:
    base = TONES[tone]
    delta = 45 if tone == "black" else -45
    return tuple(max(0, min(255, c + delta)) for c in base)  # type: ignore[return-value]


def _draw_texture(draw: ImageDraw.ImageDraw, background: Background, side: int, scale: int) -> None:
    ink = _texture_colour(background.tone)
    if background.texture == "striped":
        for y in range(0, side, 6 * scale):
            draw.rectangle((0, y, side, y + 2 * scale - 1), fill=ink)
    elif background.texture == "checkered":
        block = 8 * scale
        for y in range(0, side, block):
            for x in range((y // block) % 2 * block, side, 2 * block):
                draw.rectangle((x, y, x + block - 1, y + block - 1), fill=ink)
    elif background.texture == "dotted":
        step, radius = 6 * scale, 1 * scale
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.33
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """JPEG bytes with fixed settings (same image, same bytes)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()
