"""Synthetic data: the embedded procedural world (scenes, levels, tars, LLaVA-Pretrain set) and Claude generation.

World entry points: :class:`WorldConfig`, :func:`write_world`, :func:`write_synthetic_pairs`,
:func:`write_llava_pretrain`, :func:`write_world_tars` (see docs/world.md for the level definitions).
"""

from __future__ import annotations

from unifilter_core.synth.levels import LevelConfig, LeveledText, WorldDocument, make_caption, make_document
from unifilter_core.synth.scenes import (
    Background,
    Scene,
    SceneObject,
    fact_distance,
    render_scene,
    sample_scene,
)
from unifilter_core.synth.tars import write_world_tars
from unifilter_core.synth.world import (
    WorldConfig,
    read_world_manifest,
    write_llava_pretrain,
    write_synthetic_pairs,
    write_world,
)

__all__ = [
    "Background",
    "LevelConfig",
    "LeveledText",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "WorldDocument",
    "fact_distance",
    "make_caption",
    "make_document",
    "read_world_manifest",
    "render_scene",
    "sample_scene",
    "write_llava_pretrain",
    "write_synthetic_pairs",
    "write_world",
    "write_world_tars",
]
