"""Who owns a synthetic-pairs folder (``<data root>/synthetic/<kind>``): the world generator or a Claude run.

The two backends write the same files (``train.json``, ``val.json``, ``images/``) into the same default folder,
but they are not worth the same: world pairs are regenerated from the world's config in seconds, Claude pairs
were paid for. So:

* the world generator never writes over a folder holding a Claude run (its ``ledger.jsonl`` / ``results.jsonl``):
  :func:`refuse_claude_folder` raises :class:`PairsFolderConflict`;
* a Claude run whose folder holds world pairs (``world_pairs.json``) moves them aside to ``<folder>.world``
  (:func:`move_world_pairs_aside`), so switching a data root from the demo's world pairs to Claude pairs needs no
  manual step and loses nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

WORLD_MARKER = "world_pairs.json"  # written by synth.world.write_synthetic_pairs next to train.json
CLAUDE_FILES = ("ledger.jsonl", "results.jsonl")  # written by a Claude run (synth.claude)
ASIDE_SUFFIX = ".world"


class PairsFolderConflict(ValueError):
    """A backend was asked to write into a folder that holds the other backend's pairs."""


def holds_world_pairs(folder: str | os.PathLike[str]) -> bool:
    return (Path(folder) / WORLD_MARKER).is_file()


def holds_claude_pairs(folder: str | os.PathLike[str]) -> bool:
    return any((Path(folder) / name).exists() for name in CLAUDE_FILES)


def refuse_claude_folder(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`PairsFolderConflict` when ``folder`` holds a Claude run (before the world writes there)."""
    if holds_claude_pairs(folder):
        raise PairsFolderConflict(
            f"{folder} holds Claude-written pairs (ledger.jsonl / results.jsonl): the world generator does not "
            "write over paid-for pairs. Keep the claude backend, or move the folder aside to generate world pairs"
        )


def move_world_pairs_aside(folder: str | os.PathLike[str]) -> Path | None:
    """Before a Claude run: rename a folder of world pairs to ``<folder>.world`` (replacing an older copy).

    Returns:
        Where the world pairs went, or None when ``folder`` held none.

    Raises:
        PairsFolderConflict: ``folder`` mixes world pairs with a Claude run, or ``<folder>.world`` exists and is not
            a folder of world pairs (nothing is moved or deleted then).
    """
    folder = Path(folder)
    if not holds_world_pairs(folder):
        return None
    if holds_claude_pairs(folder):
        raise PairsFolderConflict(f"{folder} holds both world pairs and a Claude run: sort it out by hand")
    aside = folder.with_name(folder.name + ASIDE_SUFFIX)
    if aside.exists():
        if not holds_world_pairs(aside) or holds_claude_pairs(aside):
            raise PairsFolderConflict(
                f"cannot move the world pairs of {folder} aside: {aside} exists and is not a folder of world pairs"
            )
        shutil.rmtree(aside)  # an older copy of regenerable world pairs
    folder.rename(aside)
    logger.info("world pairs of %s moved to %s before the Claude run", folder, aside)
    return aside
