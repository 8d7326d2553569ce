"""Named model presets (``unifilter_core/model_configs/*.json``) and the built-in SigLIP architectures."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

_PACKAGE = "unifilter_core"
_FOLDER = "model_configs"

# Hub names of vision towers whose architecture ships as a preset (their weights never do: those come from
# the checkpoint or from a local SigLIP directory).
KNOWN_VISION_TOWERS: dict[str, str] = {
    "google/siglip-so400m-patch14-384": "siglip-so400m-patch14-384",
    "google/siglip2-so400m-patch14-384": "siglip2-so400m-patch14-384",
}


def available_presets() -> list[str]:
    """Names of every preset in ``model_configs/`` (file stems)."""
    folder = resources.files(_PACKAGE).joinpath(_FOLDER)
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    """Read a preset as a plain dict (a fresh copy each call).

    Args:
        name: file stem in ``model_configs/``, e.g. ``"tiny"``, ``"world"``, ``"released-qwen2.5-1.5b"``.

    Returns:
        The JSON content: a flat released-layout model config, or a SigLIP vision config.

    Raises:
        ValueError: when no preset of that name exists (the message lists the available ones).
    """
    resource = resources.files(_PACKAGE).joinpath(_FOLDER, f"{name}.json")
    if not resource.is_file():
        raise ValueError(
            f"unknown model preset {name!r}; available presets: {', '.join(available_presets())}"
        )
    return json.loads(resource.read_text(encoding="utf-8"))
