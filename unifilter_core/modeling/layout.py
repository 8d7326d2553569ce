"""The released checkpoint's state-dict key names <-> our module names, and strict-loading checks.

One table (:data:`RELEASED_PREFIXES`) drives every direction: transformers' own loader renames released keys
through the :func:`released_conversions` registered for both model types (so ``from_pretrained`` with any
``device_map`` reads the released layout), saving writes released names (:func:`to_released_key`), and state-dict
loads outside ``from_pretrained`` (Trainer resume) map them back (:func:`from_released_key`).

=================================================  ==========================================
released                                           ours
=================================================  ==========================================
``model.vision_tower.vision_tower.vision_model.X``  ``model.vision_tower.X`` (SiglipVisionModel)
``model.mm_projector.mlp_projector.{0,2}.*``        same
``model.{embed_tokens,layers,norm}.X``              ``model.language_model.{embed_tokens,layers,norm}.X``
``score.weight``                                    same
=================================================  ==========================================

Any key outside this table, any missing key and any shape mismatch raise ``ValueError``: a silently random
tower would still produce plausible-looking scores. This module imports no model class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from transformers.core_model_loading import WeightRenaming

RELEASED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
VISION_PREFIX = "model.vision_tower."
LANGUAGE_PREFIX = "model.language_model."
PROJECTOR_PREFIX = "model.mm_projector."
SCORE_KEY = "score.weight"
LANGUAGE_PARTS = ("embed_tokens", "layers", "norm")
# (released prefix, our prefix); the first matching entry wins
RELEASED_PREFIXES: tuple[tuple[str, str], ...] = (
    (RELEASED_VISION_PREFIX, VISION_PREFIX),
    (PROJECTOR_PREFIX, PROJECTOR_PREFIX),
    *((f"model.{part}.", f"{LANGUAGE_PREFIX}{part}.") for part in LANGUAGE_PARTS),
    (SCORE_KEY, SCORE_KEY),
)


def released_conversions() -> list[WeightRenaming]:
    """The renames transformers applies to a released checkpoint's keys while loading (reversed when saving)."""
    return [
        WeightRenaming(source_patterns="^" + re.escape(released), target_patterns=ours)
        for released, ours in RELEASED_PREFIXES
        if released != ours
    ]


def to_released_key(key: str) -> str:
    """Our state-dict key -> the released checkpoint's key."""
    for released, ours in RELEASED_PREFIXES:
        if key.startswith(ours):
            return released + key[len(ours) :]
    raise ValueError(f"state-dict key {key!r} has no place in the released layout")


def from_released_key(key: str) -> str | None:
    """The released checkpoint's key -> our key, or None when the key has no place in the model."""
    for released, ours in RELEASED_PREFIXES:
        if key.startswith(released):
            return ours + key[len(released) :]
    return None


def preview(keys: Iterable[str], limit: int = 8) -> str:
    """Sorted keys, at most ``limit`` of them, for an error message."""
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _released_name(key: str) -> str:
    try:
        return to_released_key(key)
    except ValueError:
        return key


def raise_on_problems(
    *,
    source: str,
    missing: Iterable[str] = (),
    unexpected: Iterable[str] = (),
    mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
) -> None:
    """Raise one ``ValueError`` naming every missing / unexpected key and shape mismatch (released names).

    Args:
        source: the checkpoint, for the message.
        missing: our keys the weights lack.
        unexpected: keys in the weights the model has no place for.
        mismatched: ``(our key, stored shape, model shape)``.
    """
    problems = []
    if missing := [_released_name(k) for k in missing]:
        problems.append(f"missing keys: {preview(missing)}")
    if unexpected := [_released_name(k) for k in unexpected]:
        problems.append(f"unexpected keys: {preview(unexpected)}")
    shapes = [f"{_released_name(k)} {tuple(a)} vs model {tuple(b)}" for k, a, b in mismatched]
    if shapes:
        problems.append(f"shape mismatches: {preview(shapes)}")
    if problems:
        raise ValueError(f"weights in {source} do not match the model config: " + "; ".join(problems))


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict`` that raises ``ValueError`` on any missing key, unexpected key or shape mismatch."""
    expected = module.state_dict()
    raise_on_problems(
        source=source,
        missing=set(expected) - set(state),
        unexpected=set(state) - set(expected),
        mismatched=[
            (k, tuple(state[k].shape), tuple(v.shape))
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ],
    )
    module.load_state_dict(state, strict=True)
