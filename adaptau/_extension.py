"""The one place that imports the compiled extension ``adaptau._C``.

Importing it registers the extension's operators under ``torch.ops.adaptau``: the C++/CUDA
backends' ``fused_forward`` / ``fused_backward`` and the trainer's helpers
(``uniform_negatives``, ``dropout_mask``, ``item_counts``, ``add_l2_rows_`` …). The package
works without it (the loss falls back to the reference backend, the trainer to plain torch
ops), so the other modules ask this one instead of importing ``_C`` themselves:

* :data:`IMPORT_ERROR`: ``None`` when the extension imported, else the ``ImportError``;
* :func:`load`: the extension module, or ``None``;
* :func:`has_op`: whether ``torch.ops.adaptau.<name>`` is registered by it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

__all__ = ["IMPORT_ERROR", "load", "has_op"]

try:
    from . import _C  # noqa: F401  (registers torch.ops.adaptau.*)

    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as exc:  # the package works without the extension
    _C = None
    IMPORT_ERROR = exc


def load() -> Optional[ModuleType]:
    """The imported extension module ``adaptau._C``, or ``None`` when it does not import
    (:data:`IMPORT_ERROR` says why)."""
    return _C


def has_op(name: str) -> bool:
    """True iff the extension imported and registered ``torch.ops.adaptau.<name>``."""
    return IMPORT_ERROR is None and hasattr(torch.ops.adaptau, name)
