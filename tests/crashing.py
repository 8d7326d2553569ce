"""Scorer stand-ins whose preprocessing misbehaves on marked samples (for isolation and crash-recovery tests).

Picklable (module level), so they also travel to spawned decode workers.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

#: what a marked caption does: exit the process, SIGKILL itself, or raise one of the exceptions below
ACTIONS = ("exit", "sigkill", "memory", "recursion", "unicode", "exit_once")


def misbehave(action: str, once_marker: str | None = None) -> None:
    """Do ``action`` (see :data:`ACTIONS`); ``exit_once`` exits only while ``once_marker`` does not exist yet."""
    if action == "exit":
        os._exit(9)
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "memory":
        raise MemoryError("simulated allocation failure")
    if action == "recursion":
        raise RecursionError("maximum recursion depth exceeded (simulated)")
    if action == "unicode":
        "\ud800".encode("utf-8")
    if action == "exit_once" and once_marker is not None and not Path(once_marker).exists():
        Path(once_marker).touch()
        os._exit(9)


class MisbehavingProcessor:
    """Wraps a ``UniFilterProcessor``; ``prepare_caption`` misbehaves when the caption is a key of ``actions``."""

    def __init__(self, inner: Any, actions: dict[str, str], once_marker: str | None = None) -> None:
        self.inner = inner
        self.actions = actions
        self.once_marker = once_marker

    @property
    def config(self) -> Any:
        return self.inner.config

    def prepare_caption(self, image: Any, text: str) -> Any:
        if text in self.actions:
            misbehave(self.actions[text], self.once_marker)
        return self.inner.prepare_caption(image, text)

    def prepare_document(self, texts: Any, images: Any) -> Any:
        return self.inner.prepare_document(texts, images)


class ScorerWith:
    """The real scorer with another processor (and optionally a slower ``forward``)."""

    def __init__(self, scorer: Any, processor: Any, delay_s: float = 0.0) -> None:
        self._scorer = scorer
        self.processor = processor
        self.options = scorer.options
        self.device = getattr(scorer, "device", None)
        self.model_fingerprint = scorer.model_fingerprint
        self._delay = delay_s

    def forward(self, samples: list[Any]) -> list[float]:
        if self._delay:
            import time

            time.sleep(self._delay)
        return self._scorer.forward(samples)
