"""UniFilter core library: model, processing, data readers, scoring, training, catalog.

This package never imports dagster; ``unifilter_dagster`` wraps it as assets.

The public scoring API is exported lazily (``import unifilter_core`` stays light: no torch/transformers)::

    from unifilter_core import load_scorer
    scorer = load_scorer("path/to/checkpoint", device="cpu", dtype="float32")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY_EXPORTS = {
    "load_scorer": "unifilter_core.scorer",
    "Scorer": "unifilter_core.scorer",
    "ScoreResult": "unifilter_core.records",
}

__all__ = ["Scorer", "ScoreResult", "__version__", "load_scorer"]

if TYPE_CHECKING:  # pragma: no cover
    from unifilter_core.records import ScoreResult
    from unifilter_core.scorer import Scorer, load_scorer


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unifilter_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_EXPORTS))
