"""Phrase pools and small text builders for :mod:`unifilter_core.synth.levels` (wording is data, kept apart)."""

from __future__ import annotations

import random
import re
import string

from unifilter_core.synth.scenes import COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, TONES, Scene

# every word that states a fact about a scene; level-0 texts contain none of them
FACT_WORDS: frozenset[str] = frozenset(
    [
        *SHAPES,
        *(s + "s" for s in SHAPES),
        "crosses",
        *COLOURS,
        *TONES,
        "gray",
        *TEXTURES,
        *SIZES,
        "big",
        "little",
    ]
    + [
        "top",
        "bottom",
        "left",
        "right",
        "center",
        "centre",
        "middle",
        "corner",
        "background",
        "shape",
        "shapes",
    ]
)
_WORD = re.compile(r"[a-z]+")


def mentions_facts(text: str) -> bool:
    """True when ``text`` contains any word that states a fact about a scene (see :data:`FACT_WORDS`)."""
    return any(w in FACT_WORDS for w in _WORD.findall(text.lower()))


FULL_TEMPLATES: tuple[str, ...] = (
    "{objs} on a {bg} background.",
    "A {bg} background with {objs}.",
    "This image shows {objs} on a {bg} background.",
    "There {be} {objs}, set against a {bg} background.",
    "A picture of {objs} on a {bg} background.",
    "On a {bg} background: {objs}.",
)
POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
TITLES: tuple[str, ...] = (
    "Shape study {n}",
    "Notes from drawing class, week {n}",
    "A small gallery",
    "Practice sheet {n}",
    "Our pattern collection",
    "Sorting exercise {n}",
    "Pictures from the workshop",
)
CLOSINGS: tuple[str, ...] = (
    "That is all for today.",
    "More pictures next week.",
    "Thanks for looking!",
    "Questions are welcome in the comments.",
)
LEADS: tuple[str, ...] = ("", "", "Picture {k}. ", "Image {k}: ", "Next, ", "Here, ")

_COUNT_WORDS = {
    1: "a",
    2: "two",
    3: "three",
    4: "four",
    5: "five",
    6: "six",
    7: "seven",
    8: "eight",
    9: "nine",
}
_OPPOSITE_SIDE = {"top": "bottom", "bottom": "top", "left": "right", "right": "left"}

_UNRELATED = (
    ("The city council", "My neighbour", "The bakery on Elm Street", "Our football team", "The new tax law"),
    ("announced", "postponed", "celebrated", "reviewed", "cancelled", "changed"),
    (
        "the annual picnic",
        "a new pricing plan",
        "its sourdough recipe",
        "the winter timetable",
        "the opening hours",
    ),
    (
        "on Monday",
        "after months of delay",
        "despite the rain",
        "for the third year in a row",
        "without warning",
    ),
)
_SPAM_TEMPLATES = (
    "BUY {p} NOW!!! {d}% OFF, free shipping at {site}",
    "Limited offer: {p} for only ${price}. Click {site} today!",
    "You have WON a free gift card!!! Claim it at {site} before midnight",
    "Hot deal on {p}, {d}% discount, order at {site}",
    "Earn ${price} a day from home, no experience needed, visit {site}",
)
_SPAM_PRODUCTS = (
    "cheap watches",
    "designer handbags",
    "miracle diet pills",
    "crypto coins",
    "luxury perfume",
)
_SPAM_SITES = ("www.best-deals-4u.biz", "cheap-offers.example", "win-prizes.club", "megasale-online.shop")
_WEB_FIXED = (
    "Click here to enlarge",
    "thumbnail",
    "stock photo",
    "Download free",
    "view full size",
    "All rights reserved",
    "Posted by admin",
    "placeholder",
    "Screenshot",
    "Share this: Facebook Twitter",
)


def count_word(n: int) -> str:
    return _COUNT_WORDS.get(n, str(n))


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def join_and(items: list[str]) -> str:
    """``a`` / ``a and b`` / ``a, b and c``."""
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _groups(scene: Scene) -> list[tuple[tuple[str, str, str], list[str]]]:
    groups: dict[tuple[str, str, str], list[str]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.appearance(), []).append(obj.position)
    return list(groups.items())


def _sides(position: str) -> list[str]:
    row, col = divmod(POSITIONS.index(position), 3)
    sides = [
        s
        for s, ok in (("top", row == 0), ("bottom", row == 2), ("left", col == 0), ("right", col == 2))
        if ok
    ]
    return sides or ["middle"]


def _loose_object(appearance: tuple[str, str, str], n: int, with_size: bool) -> str:
    shape, colour, size = appearance
    adj = f"{size} {colour}" if with_size else colour
    return f"a {adj} {shape}" if n == 1 else f"some {adj} {plural(shape)}"


def level2_caption(scene: Scene, variant: str, rng: random.Random) -> str:
    """A level-2 caption: ``vague``, ``partial`` (a subset of objects) or ``minor_error`` (one attribute wrong).

    The register never names grid positions or the background texture, so it never reads as a level-3 caption.
    """
    groups = _groups(scene)
    n = len(scene.objects)
    if variant == "vague":
        colours = sorted({app[1] for app, _ in groups})
        options = [
            f"Some shapes on a {scene.background.tone} background."
            if n > 1
            else f"One shape on a {scene.background.tone} background.",
            "A few simple shapes." if n > 1 else "A simple shape.",
            f"A picture with {join_and(colours)} shapes."
            if n > 1
            else f"A picture with a {colours[0]} shape.",
        ]
        return rng.choice(options)
    if variant == "partial":
        k = rng.randint(1, len(groups) - 1) if len(groups) > 1 else 1
        chosen = rng.sample(groups, k)
        phrases = join_and([_loose_object(app, len(cells), rng.random() < 0.5) for app, cells in chosen])
        more = rng.choice((", among other things", " and more", "")) if k < len(groups) else ""
        template = rng.choice(
            ("The picture contains {x}{m}.", "I can see {x}{m}.", "{X}{m}.", "Shows {x}{m}.")
        )
        text = template.format(x=phrases, X=phrases[0].upper() + phrases[1:], m=more)
        return text
    if variant == "minor_error":
        app, cells = rng.choice(groups)
        shape, colour, size = app
        side = rng.choice(_sides(cells[0]))
        if rng.random() < 0.5 or side == "middle":
            size = "large" if size == "small" else "small"
        else:
            side = _OPPOSITE_SIDE[side]
        obj = _loose_object((shape, colour, size), len(cells), with_size=True)
        template = rng.choice(
            ("{X} somewhere near the {s}.", "{X}, roughly at the {s}.", "Mostly {x} near the {s}.")
        )
        return template.format(X=obj[0].upper() + obj[1:], x=obj, s=side)
    raise ValueError(f"unknown level-2 variant {variant!r} (vague | partial | minor_error)")


def web_noise(rng: random.Random) -> str:
    """Alt-text fragments, filenames and boilerplate (level 1)."""
    makers = (
        lambda: f"IMG_{rng.randint(1000, 9999)}.jpg",
        lambda: f"DSC{rng.randint(10000, 99999)}.JPG",
        lambda: f"image ({rng.randint(1, 40)}).png",
        lambda: f"untitled-{rng.randint(1, 9)}.png",
        lambda: f"{rng.choice((150, 300, 640, 1024))}x{rng.choice((150, 200, 480, 768))}",
        lambda: f"Photo by user{rng.randint(10, 999)}",
        lambda: f"banner_{rng.randint(1, 99)}_final.jpg",
        lambda: f"(c) {rng.randint(2009, 2024)}",
        lambda: rng.choice(_WEB_FIXED),
    )
    parts = [rng.choice(makers)() for _ in range(rng.randint(1, 3))]
    return rng.choice((" | ", " - ", " ", ", ")).join(parts)


def level0_text(variant: str, rng: random.Random) -> str:
    """Unrelated prose, spam or gibberish that states no fact about any scene (level 0)."""
    for _ in range(20):
        text = _level0_once(variant, rng)
        if not mentions_facts(text):
            return text
    raise RuntimeError(f"could not draw a fact-free level-0 {variant} text")  # pragma: no cover


def _level0_once(variant: str, rng: random.Random) -> str:
    if variant == "unrelated":
        sentences = [
            " ".join(rng.choice(part) for part in _UNRELATED) + "." for _ in range(rng.randint(1, 2))
        ]
        return " ".join(sentences)
    if variant == "spam":
        return rng.choice(_SPAM_TEMPLATES).format(
            p=rng.choice(_SPAM_PRODUCTS), d=rng.choice((30, 50, 70, 90)), price=rng.randint(9, 999),
            site=rng.choice(_SPAM_SITES),
        )  # fmt: skip
    if variant == "gibberish":
        if rng.random() < 0.5:
            syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
            words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(rng.randint(3, 10))]
            return " ".join(words)
        alphabet = string.ascii_letters + string.digits + "#@%&*  "
        return re.sub(r"\s+", " ", "".join(rng.choices(alphabet, k=rng.randint(12, 60)))).strip() or "qxz"
    raise ValueError(f"unknown level-0 variant {variant!r} (unrelated | spam | gibberish)")
