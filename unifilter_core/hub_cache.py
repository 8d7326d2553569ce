"""Hugging Face hub ids (``owner/name``) resolved from the LOCAL cache only: nothing is ever downloaded.

The original README passes ``--model-path weizhiwang/UniFilter-Qwen2.5-1.5B``. A reference that is an existing
folder is used as a folder; one that is not and reads ``owner/name`` is looked up in the local hub cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) with ``local_files_only``; when it is
not there the error gives the exact download command.
"""

from __future__ import annotations

import logging
import os
import re
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def looks_like_hub_id(reference: str) -> bool:
    """Whether ``reference`` has the form ``owner/name`` (one slash, hub-safe characters, no ``..``)."""
    return bool(_HUB_ID.fullmatch(reference)) and ".." not in reference


def hub_cache_dir() -> Path:
    """The hub cache folder the environment names now (read at call time, not at import)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def download_command(repo_id: str) -> str:
    """The command that puts ``repo_id`` into the cache with the installed huggingface_hub's CLI.

    huggingface_hub >= 0.34 ships ``hf`` (1.x and later only ``hf``); older releases ship ``huggingface-cli``.
    The installed distribution's console scripts decide, not whatever happens to be on ``PATH``.
    """
    try:
        scripts = {entry.name for entry in metadata.distribution("huggingface_hub").entry_points}
    except metadata.PackageNotFoundError:
        scripts = set()
    cli = "huggingface-cli" if "hf" not in scripts and "huggingface-cli" in scripts else "hf"
    return f"{cli} download {repo_id}"


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` (its ``main`` revision), or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        folder = snapshot_download(repo_id, cache_dir=str(hub_cache_dir()), local_files_only=True)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, FileNotFoundError):
        return None
    path = Path(folder)
    return path if path.is_dir() else None


def resolve_reference(reference: str | os.PathLike[str], *, what: str) -> Path:
    """A local folder for ``reference``: the folder itself, or the cached snapshot of a hub id.

    Args:
        reference: a path, or a hub id ``owner/name``.
        what: what the reference is for (``"checkpoint"``, ``"vision tower"``), for messages.

    Returns:
        The existing folder, or the path as given when it is neither a folder nor a hub id (callers report it).

    Raises:
        ValueError: a hub id that is not in the local cache (the message gives the download command).
    """
    path = Path(reference).expanduser()
    text = str(reference)
    if path.exists() or not looks_like_hub_id(text):
        return path
    snapshot = cached_snapshot(text)
    if snapshot is None:
        raise ValueError(
            f"{what} {text!r} is neither a folder nor in the local Hugging Face cache ({hub_cache_dir()}); models "
            f"are never downloaded here: run `{download_command(text)}` first (or pass the folder it downloaded to)"
        )
    logger.info("%s %s resolved from the hub cache: %s", what, text, snapshot)
    return snapshot
