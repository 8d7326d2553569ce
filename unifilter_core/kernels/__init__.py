"""Optional fast kernels behind a registry; every op has an eager PyTorch reference that always works.

Ops registered here:

* ``varlen_attention`` (:mod:`.attention`): packed causal attention over concatenated sequences
  (``reference`` per-sequence SDPA; ``torch_varlen``; ``flash_attn``);
* ``image_normalize`` (:mod:`.image_norm`): uint8 NHWC -> normalised NCHW (``reference``; ``triton``).

Use :func:`get_kernel` (``get_kernel("varlen_attention", "auto", device)``); it falls back to the reference,
logging why once. :func:`list_kernels` shows what is available on a device. Importing this package imports only
torch (Triton and flash-attn are imported on first use).
"""

from unifilter_core.kernels import attention, image_norm
from unifilter_core.kernels.registry import (
    REFERENCE,
    KernelImpl,
    get_kernel,
    list_kernels,
    register_kernel,
    reset_fallback_log,
    why_unavailable,
)

attention.register()
image_norm.register()

__all__ = [
    "REFERENCE",
    "KernelImpl",
    "get_kernel",
    "list_kernels",
    "register_kernel",
    "reset_fallback_log",
    "why_unavailable",
]
