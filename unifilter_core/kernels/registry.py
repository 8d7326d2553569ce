"""A registry of optional kernels, each op backed by an always-available eager PyTorch reference.

An *op* (e.g. ``"varlen_attention"``) has several *implementations*: the reference (pure PyTorch, any device) and
optional fast ones (flash-attn, a torch CUDA kernel, a Triton kernel). Each implementation declares an availability
check; :func:`get_kernel` returns the preferred available one for a device and falls back to the reference,
logging the reason once per (op, implementation, device type).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

REFERENCE = "reference"


@dataclass(frozen=True)
class KernelImpl:
    """One implementation of an op.

    Attributes:
        op: the op name, e.g. ``"varlen_attention"``.
        name: the implementation name; ``"reference"`` is the eager PyTorch one.
        fn: the callable (same signature for every implementation of an op).
        available: ``available(device) -> str | None``: None when usable on that device, else why not.
        priority: higher wins in automatic selection; only priorities > 0 are picked automatically.
        description: one line for listings and logs.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    available: Callable[[torch.device], str | None] = field(default=lambda device: None)
    priority: int = 0
    description: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


_REGISTRY: dict[str, dict[str, KernelImpl]] = {}
_LOGGED: set[tuple[str, str, str, str]] = set()
_LOCK = threading.Lock()


def register_kernel(
    op: str,
    name: str,
    fn: Callable[..., Any],
    *,
    available: Callable[[torch.device], str | None] | None = None,
    priority: int = 0,
    description: str = "",
) -> KernelImpl:
    """Register an implementation (re-registering a name replaces it).

    Args:
        op: the op name.
        name: implementation name; register ``"reference"`` first for every op.
        fn: the implementation.
        available: availability check (None = always available).
        priority: automatic-selection rank (higher first).
        description: shown by :func:`list_kernels`.

    Returns:
        The registered :class:`KernelImpl`.
    """
    impl = KernelImpl(op, name, fn, available or (lambda device: None), priority, description)
    with _LOCK:
        _REGISTRY.setdefault(op, {})[name] = impl
    return impl


def _log_once(op: str, name: str, device: torch.device, message: str) -> None:
    key = (op, name, device.type, message)
    with _LOCK:
        if key in _LOGGED:
            return
        _LOGGED.add(key)
    logger.info(message)


def why_unavailable(op: str, name: str, device: torch.device | str = "cpu") -> str | None:
    """None when ``name`` can run ``op`` on ``device``, else the reason (also for unknown names)."""
    impls = _REGISTRY.get(op, {})
    if name not in impls:
        return f"no implementation {name!r} of {op!r} (known: {sorted(impls)})"
    try:
        return impls[name].available(torch.device(device))
    except Exception as exc:  # an availability check must never break selection
        return f"availability check failed: {type(exc).__name__}: {exc}"


def get_kernel(op: str, prefer: str | None = None, device: torch.device | str = "cpu") -> KernelImpl:
    """The implementation of ``op`` to use on ``device``.

    Args:
        op: the op name.
        prefer: an implementation name, ``"auto"``/None (highest-priority available), or ``"reference"``.
        device: where the inputs live.

    Returns:
        The preferred implementation if available, else the best available one, else the reference; every
        fallback is logged once.

    Raises:
        ValueError: unknown op.
    """
    if op not in _REGISTRY:
        raise ValueError(f"unknown kernel op {op!r}; registered ops: {sorted(_REGISTRY)}")
    device = torch.device(device)
    impls = _REGISTRY[op]
    if prefer not in (None, "auto"):
        reason = why_unavailable(op, prefer, device)
        if reason is None:
            return impls[prefer]
        _log_once(
            op, prefer, device, f"kernel {op}/{prefer} unavailable on {device.type} ({reason}); falling back"
        )
    ranked = sorted(impls.values(), key=lambda impl: -impl.priority)
    for impl in ranked:
        if impl.name == REFERENCE or impl.priority <= 0:  # test-only variants are never picked automatically
            continue
        reason = why_unavailable(op, impl.name, device)
        if reason is None:
            _log_once(op, impl.name, device, f"kernel {op}: using {impl.name} on {device.type}")
            return impl
        _log_once(op, impl.name, device, f"kernel {op}/{impl.name} skipped on {device.type}: {reason}")
    return impls[REFERENCE]


def list_kernels(device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """Every registered implementation with its availability on ``device`` (for logs, benchmarks, docs)."""
    rows = []
    for op in sorted(_REGISTRY):
        for impl in sorted(_REGISTRY[op].values(), key=lambda i: -i.priority):
            rows.append(
                {
                    "op": op,
                    "name": impl.name,
                    "priority": impl.priority,
                    "unavailable": why_unavailable(op, impl.name, device),
                    "description": impl.description,
                }
            )
    return rows


def reset_fallback_log() -> None:
    """Forget which fallbacks were logged (tests)."""
    with _LOCK:
        _LOGGED.clear()
