"""Texts at four quality levels for world scenes: captions and interleaved documents.

Levels (docs/world.md has the full definitions):

* 3: accurate, specific, fluent, fully grounded: every object with count, size, colour and position, and the
  background, in the "full" register.
* 2: accurate but vague, incomplete (a subset of the objects) or wrong in one minor attribute (size or rough
  location), in a looser register that never names positions on the grid or the background texture.
* 1: mostly wrong about the image: the full register with 2+ facts changed (``perturbed``, the same wording style
  as the level-3 text of the same image), another scene's full caption (``other_scene``) or web noise (``web``).
* 0: unrelated text, spam or gibberish, mentioning no fact of the world.

Every function takes an explicit ``random.Random``; nothing here touches global random state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from unifilter_core.synth import _phrases as P
from unifilter_core.synth._phrases import FACT_WORDS, mentions_facts  # noqa: F401 (re-exported)
from unifilter_core.synth.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    TEXTURES,
    TONES,
    Background,
    Scene,
    SceneObject,
    fact_distance,
    sample_scene,
)

LEVELS = (0, 1, 2, 3)
_PERTURBABLE = ("colour", "shape", "size", "position", "count", "background")


def _default(weights: dict[str, float]):
    return field(default_factory=lambda: dict(weights))


@dataclass
class LevelConfig:
    """How texts at each level are drawn (all mixes are relative weights)."""

    # level 1: style-matched with wrong facts / another scene's full caption / web noise
    level1_mix: dict[str, float] = _default({"perturbed": 0.55, "other_scene": 0.3, "web": 0.15})
    # level 2: vague / accurate subset of the objects / one minor attribute wrong
    level2_mix: dict[str, float] = _default({"vague": 0.35, "partial": 0.4, "minor_error": 0.25})
    # level 0: unrelated prose / spam / gibberish
    level0_mix: dict[str, float] = _default({"unrelated": 0.4, "spam": 0.35, "gibberish": 0.25})
    # level-1 documents: image descriptions that do not match / web-noise text slots
    doc_level1_mix: dict[str, float] = _default({"mismatch": 0.75, "noise": 0.25})
    # which facts a level-1 perturbation changes (each chosen fact is changed once)
    perturb_weights: dict[str, float] = _default(
        {"colour": 0.35, "shape": 0.25, "position": 0.15, "size": 0.1, "count": 0.1, "background": 0.05}
    )
    # facts every level-1 perturbation changes first (colour survives the tower's pooling: easy to see)
    always_perturb: tuple[str, ...] = ("colour",)
    min_wrong_facts: int = 2  # a level-1 caption contradicts the image in at least this many facts
    extra_fact_prob: float = 0.3  # chance of one more wrong fact than the minimum

    def __post_init__(self) -> None:
        known = {
            "level1_mix": {"perturbed", "other_scene", "web"},
            "level2_mix": {"vague", "partial", "minor_error"},
            "level0_mix": {"unrelated", "spam", "gibberish"},
            "doc_level1_mix": {"mismatch", "noise"},
            "perturb_weights": set(_PERTURBABLE),
        }
        self.always_perturb = tuple(self.always_perturb)
        if set(self.always_perturb) - set(_PERTURBABLE):
            raise ValueError(
                f"always_perturb must hold facts among {_PERTURBABLE}, got {self.always_perturb}"
            )
        for name, keys in known.items():
            mix = getattr(self, name)
            if set(mix) - keys or any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
                raise ValueError(f"{name} must map some of {sorted(keys)} to non-negative weights, got {mix}")
        if self.min_wrong_facts < 1:
            raise ValueError(f"min_wrong_facts must be >= 1, got {self.min_wrong_facts}")


@dataclass(frozen=True, slots=True)
class CaptionStyle:
    """The wording of a full-register caption: template and size words. Levels 3 and 1 share styles."""

    template: int
    small_word: str
    large_word: str


@dataclass(frozen=True, slots=True)
class LeveledText:
    """A generated text with its true level; ``claimed`` is the scene a full-register text describes."""

    text: str
    level: int
    variant: str
    claimed: Scene | None = None


@dataclass(frozen=True, slots=True)
class WorldDocument:
    """An interleaved document: ``slots`` holds texts and ``None`` at image slots; ``scenes`` in slot order."""

    slots: tuple[str | None, ...]
    scenes: tuple[Scene, ...]
    level: int
    variant: str


def _pick(rng: random.Random, mix: dict[str, float]) -> str:
    keys = sorted(mix)
    return rng.choices(keys, weights=[mix[k] for k in keys])[0]


def sample_style(rng: random.Random) -> CaptionStyle:
    """Draw a wording style for full-register captions."""
    small, large = rng.choice((("small", "large"), ("small", "big"), ("little", "big")))
    return CaptionStyle(template=rng.randrange(len(P.FULL_TEMPLATES)), small_word=small, large_word=large)


# ----------------------------------------------------------------------------------------------- full register
def full_caption(scene: Scene, style: CaptionStyle) -> str:
    """The full-register caption of ``scene``: every object with count, size, colour, position, and background."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.appearance(), []).append(obj.position)
    phrases = [_group_phrase(app, cells, style) for app, cells in groups.items()]
    bg = _background_phrase(scene.background)
    be = "is" if len(next(iter(groups.values()))) == 1 else "are"
    text = P.FULL_TEMPLATES[style.template].format(objs=P.join_and(phrases), bg=bg, be=be)
    return text[0].upper() + text[1:]


def _group_phrase(appearance: tuple[str, str, str], cells: list[str], style: CaptionStyle) -> str:
    shape, colour, size = appearance
    size_word = style.small_word if size == "small" else style.large_word
    n = len(cells)
    noun = P.plural(shape) if n > 1 else shape
    if n == 1:
        where = P.POSITION_PHRASES[cells[0]]
    else:
        where = "(" + P.join_and([f"one {P.POSITION_PHRASES[c]}" for c in cells]) + ")"
    return f"{P.count_word(n)} {size_word} {colour} {noun} {where}"


def _background_phrase(bg: Background) -> str:
    return f"plain {bg.tone}" if bg.texture == "plain" else f"{bg.tone} {bg.texture}"


def perturb_scene(
    scene: Scene,
    rng: random.Random,
    n_facts: int,
    weights: dict[str, float],
    max_objects: int,
    always: tuple[str, ...] = (),
) -> Scene:
    """Change ``n_facts`` distinct facts of ``scene`` (counts only go up, never beyond ``max_objects``).

    The facts named in ``always`` are changed first (one each), the rest are drawn by ``weights``. The result is
    a plausible scene (distinct cells, at most ``max_objects`` objects), so its full caption reads like any
    level-3 caption.
    """
    objects = list(scene.objects)
    background = scene.background
    changed: set[tuple[int, str]] = set()
    for step in range(n_facts):
        forced = always[step] if step < len(always) else None
        if forced is not None and _can_change(forced, objects, changed, max_objects):
            kind = forced
        else:
            options = {
                k: w for k, w in weights.items() if w > 0 and _can_change(k, objects, changed, max_objects)
            }
            if not options:
                break
            kind = _pick(rng, options)
        if kind == "background":
            background = _change_background(background, rng)
            changed.add((-1, kind))
        elif kind == "count":
            free = [p for p in POSITIONS if p not in {o.position for o in objects}]
            shape, colour, size = rng.choice(objects).appearance()
            objects.append(SceneObject(shape, colour, size, rng.choice(free)))
            changed.add((len(objects) - 1, "added"))
        else:
            i = rng.choice([i for i in range(len(objects)) if (i, kind) not in changed])
            objects[i] = _change_attribute(objects[i], kind, objects, rng)
            changed.add((i, kind))
    return Scene(tuple(objects), background)


def _can_change(
    kind: str, objects: list[SceneObject], changed: set[tuple[int, str]], max_objects: int
) -> bool:
    if kind == "background":
        return (-1, kind) not in changed
    if kind == "count":
        return len(objects) < max_objects
    return any((i, kind) not in changed for i in range(len(objects)))


def _change_background(bg: Background, rng: random.Random) -> Background:
    if rng.random() < 0.5:
        return Background(rng.choice([t for t in TONES if t != bg.tone]), bg.texture)
    return Background(bg.tone, rng.choice([t for t in TEXTURES if t != bg.texture]))


def _change_attribute(
    obj: SceneObject, kind: str, objects: list[SceneObject], rng: random.Random
) -> SceneObject:
    shape, colour, size, position = obj.shape, obj.colour, obj.size, obj.position
    if kind == "shape":
        shape = rng.choice([s for s in SHAPES if s != shape])
    elif kind == "colour":
        colour = rng.choice([c for c in COLOURS if c != colour])
    elif kind == "size":
        size = "large" if size == "small" else "small"
    else:
        position = rng.choice([p for p in POSITIONS if p not in {o.position for o in objects}])
    return SceneObject(shape, colour, size, position)


# ------------------------------------------------------------------------------------------------------ captions
def make_caption(
    scene: Scene,
    level: int,
    rng: random.Random,
    config: LevelConfig,
    *,
    max_objects: int = 3,
    style: CaptionStyle | None = None,
    variant: str | None = None,
) -> LeveledText:
    """A caption of ``scene`` at ``level``.

    Args:
        scene: the true contents of the image.
        level: 0..3.
        rng: the random source.
        config: the level mixes.
        max_objects: the world's object limit (wrong captions never claim more objects than real ones can have).
        style: the full-register wording; pass the style of the image's level-3 caption to get a style-matched
            level-1 caption. Drawn when None.
        variant: force a variant of the level (e.g. ``"perturbed"``); drawn from the level's mix when None.
    """
    style = style or sample_style(rng)
    if level == 3:
        return LeveledText(full_caption(scene, style), 3, "full", scene)
    if level == 2:
        variant = variant or _pick(rng, config.level2_mix)
        return LeveledText(P.level2_caption(scene, variant, rng), 2, variant)
    if level == 1:
        variant = variant or _pick(rng, config.level1_mix)
        if variant == "web":
            return LeveledText(P.web_noise(rng), 1, variant)
        claimed = wrong_scene(scene, variant, rng, config, max_objects)
        return LeveledText(full_caption(claimed, style), 1, variant, claimed)
    if level == 0:
        variant = variant or _pick(rng, config.level0_mix)
        return LeveledText(P.level0_text(variant, rng), 0, variant)
    raise ValueError(f"level must be one of {LEVELS}, got {level}")


def wrong_scene(
    scene: Scene, variant: str, rng: random.Random, config: LevelConfig, max_objects: int
) -> Scene:
    """A scene that contradicts ``scene`` in at least ``config.min_wrong_facts`` facts.

    ``variant`` is ``"perturbed"`` (the true scene with facts changed) or ``"other_scene"`` (an unrelated scene).
    """
    n_facts = config.min_wrong_facts + int(rng.random() < config.extra_fact_prob)
    for _ in range(50):
        if variant == "perturbed":
            claimed = perturb_scene(
                scene, rng, n_facts, config.perturb_weights, max_objects, config.always_perturb
            )
        elif variant == "other_scene":
            claimed = sample_scene(rng, max_objects)
        else:
            raise ValueError(f"unknown wrong-scene variant {variant!r} (perturbed | other_scene)")
        if fact_distance(scene, claimed) >= config.min_wrong_facts:
            return claimed
    raise ValueError(
        f"could not draw a scene {config.min_wrong_facts} facts away from {scene}; "
        "lower min_wrong_facts or allow more perturbation kinds"
    )


# ----------------------------------------------------------------------------------------------------- documents
def make_document(
    scenes: list[Scene],
    level: int,
    rng: random.Random,
    config: LevelConfig,
    *,
    max_objects: int = 3,
    style: CaptionStyle | None = None,
) -> WorldDocument:
    """An interleaved document with one image per scene, at ``level``.

    Levels 3, 2 and 1-``mismatch`` share the document frame (title, image/description order, closing); their
    descriptions are level-3 captions, level-2 captions, and full-register captions that contradict their image.
    Level 1-``noise`` fills text slots with web boilerplate; level 0 with spam, unrelated prose or gibberish.
    Pass the same ``style`` to documents over the same scenes to make their full-register texts style-matched.
    """
    if not scenes:
        raise ValueError("a document needs at least one scene")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level}")
    variant = {3: "full", 2: "loose"}.get(level, "")
    if level == 1:
        variant = _pick(rng, config.doc_level1_mix)
    elif level == 0:
        variant = _pick(rng, config.level0_mix)
    style = style or sample_style(rng)
    image_first = rng.random() < 0.5
    slots: list[str | None] = [_doc_filler(level, variant, rng, P.TITLES)]
    for k, scene in enumerate(scenes, start=1):
        text = _doc_description(scene, k, level, variant, style, rng, config, max_objects)
        slots.extend([None, text] if image_first else [text, None])
    if rng.random() < 0.5:
        slots.append(_doc_filler(level, variant, rng, P.CLOSINGS))
    return WorldDocument(tuple(slots), tuple(scenes), level, variant)


def _doc_filler(level: int, variant: str, rng: random.Random, pool: tuple[str, ...]) -> str:
    if level == 0:
        return P.level0_text(variant, rng)
    if level == 1 and variant == "noise":
        return P.web_noise(rng)
    return rng.choice(pool).format(n=rng.randint(2, 40))


def _doc_description(
    scene: Scene,
    k: int,
    level: int,
    variant: str,
    style: CaptionStyle,
    rng: random.Random,
    config: LevelConfig,
    max_objects: int,
) -> str:
    if level == 0:
        return P.level0_text(variant, rng)
    if level == 1 and variant == "noise":
        return P.web_noise(rng)
    if level == 1:
        mix = {k: w for k, w in config.level1_mix.items() if k != "web"} or {"perturbed": 1.0}
        text = full_caption(wrong_scene(scene, _pick(rng, mix), rng, config, max_objects), style)
    elif level == 2:
        text = P.level2_caption(scene, _pick(rng, config.level2_mix), rng)
    else:
        text = full_caption(scene, style)
    lead = rng.choice(P.LEADS).format(k=k)
    return lead + (text[0].lower() + text[1:] if lead.endswith(", ") else text)
