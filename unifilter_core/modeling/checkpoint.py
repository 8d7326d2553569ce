"""Released-layout weights outside ``from_pretrained``: mapping a checkpoint's state dict for a model that
already exists (Trainer resume and best-model reload: ``map_released_state`` then ``load_state_strict``).

``UniFilterForQualityScoring.from_pretrained`` reads the released layout through transformers' own loader (the
conversion mapping of ``layout.py``); this module covers what that hook cannot do: a plain ``load_state_dict`` of
released-layout tensors into a built model, with the tower taken from the local SigLIP folder when the file has
none. It may import the model classes; they never import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from unifilter_core.modeling.configuration_unifilter import UniFilterConfig
from unifilter_core.modeling.layout import (
    VISION_PREFIX,
    from_released_key,
    load_state_strict,
    preview,
)
from unifilter_core.modeling.safetensors_io import WEIGHTS_NAME
from unifilter_core.modeling.vision_tower import tower_weights_folder, vision_weights_from_dir

__all__ = ["load_state_strict", "map_released_state"]


def map_released_state(
    state: Mapping[str, torch.Tensor], config: UniFilterConfig, directory: Path, vision_tower: str | None
) -> dict[str, torch.Tensor]:
    """Released-layout tensors -> our keys, adding tower weights from a SigLIP directory when absent.

    Raises:
        ValueError: on keys that have no place in the model, or a missing tower without a local folder.
    """
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state.items():
        ours = from_released_key(key)
        if ours is None:
            unexpected.append(key)
        else:
            mapped[ours] = tensor
    if unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} has unexpected keys: {preview(unexpected)}")
    if not any(k.startswith(VISION_PREFIX) for k in mapped):
        reference = vision_tower if vision_tower is not None else config.mm_vision_tower
        local = tower_weights_folder(reference, directory, is_override=vision_tower is not None)
        mapped.update({VISION_PREFIX + k: v for k, v in vision_weights_from_dir(local).items()})
    return mapped
