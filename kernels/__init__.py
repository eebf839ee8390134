"""Triton kernels of adaptau (installed as ``adaptau.kernels``).

``AVAILABLE`` is True iff Triton imports; then ``forward`` and ``backward`` implement the
backend contract stated in :mod:`adaptau.loss._contract` for CUDA tensors (and for CPU tensors
under ``TRITON_INTERPRET=1``, where Triton's interpreter runs the very same kernels).

Item gradients are accumulated either with fp32 atomic adds (``"atomic"``, the default)
or with a deterministic sorted segment reduction (``"segment"``). Choose with the
environment variable ``ADAPTAU_TRITON_ITEM_GRAD=atomic|segment`` (read at import) or
:func:`set_item_grad_mode` at run time.
"""

from __future__ import annotations

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install: the package must still import
    _IMPORT_ERROR = exc

if _IMPORT_ERROR is None:
    from .softmax_loss import (  # noqa: F401
        ITEM_GRAD_MODES,
        backward,
        effective_item_grad_mode,
        forward,
        get_item_grad_mode,
        set_item_grad_mode,
    )

    AVAILABLE = True
else:
    AVAILABLE = False
    ITEM_GRAD_MODES = ("atomic", "segment")

    def _unavailable(*args, **kwargs):
        raise RuntimeError(f"adaptau.kernels: Triton is not usable here ({_IMPORT_ERROR})")

    forward = backward = set_item_grad_mode = get_item_grad_mode = _unavailable
    effective_item_grad_mode = _unavailable

__all__ = [
    "AVAILABLE",
    "forward",
    "backward",
    "set_item_grad_mode",
    "get_item_grad_mode",
    "effective_item_grad_mode",
    "ITEM_GRAD_MODES",
]
