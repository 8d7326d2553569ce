"""Progress bars for long CLI work that stay quiet when nobody is watching.

A bar is drawn on stderr only when stderr is a terminal, so logs, CI output, Dagster runs and pipes get no
carriage-return noise. ``UNIFILTER_PROGRESS=0`` turns bars off everywhere, ``UNIFILTER_PROGRESS=1`` forces them
on (e.g. to watch a job through ``script``)::

    from unifilter_core.progress import progress

    for tar in progress(tars, desc="scoring", unit="tar"):
        ...
    with progress(total=n_samples, desc="thumbnails", unit="sample") as bar:
        bar.update(1)

Library code may call :func:`progress` freely: a disabled bar costs one attribute check per update.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: Environment switch: ``0`` never draws bars, ``1`` always does; unset: only when stderr is a terminal.
PROGRESS_ENV = "UNIFILTER_PROGRESS"


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether bars are drawn: ``$UNIFILTER_PROGRESS`` if set to 0/1, else whether ``stream`` (stderr) is a TTY."""
    flag = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on stderr, disabled unless :func:`progress_enabled`.

    Args:
        iterable: what to iterate (optional; without it call ``update(n)`` on the returned bar).
        total: the expected count (taken from ``len(iterable)`` by tqdm when possible).
        desc: a short label shown before the bar.
        unit: what one step is (``tar``, ``sample``, ``batch``).
        leave: keep the finished bar on screen.
        **kwargs: passed to :class:`tqdm.tqdm` (``disable`` here overrides the automatic choice).

    Returns:
        The bar; iterate it, or use it as a context manager and call ``update``.
    """
    kwargs.setdefault("disable", not progress_enabled())
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, **kwargs)


@contextmanager
def transformers_bars() -> Iterator[None]:
    """transformers' own bars (e.g. "Loading weights") follow :func:`progress_enabled` inside the block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    wanted = progress_enabled()
    if wanted != before:
        (hf_logging.enable_progress_bar if wanted else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if wanted != before:
            (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


__all__ = ["PROGRESS_ENV", "progress", "progress_enabled", "transformers_bars"]
