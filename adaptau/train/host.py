"""Host-side tuning of the training process: the C library's allocator."""

from __future__ import annotations

import sys

__all__ = ["keep_freed_heap"]


def keep_freed_heap(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse instead of handing it back to
    the OS; returns True when applied, False where the C library is not glibc.

    A CPU training step allocates and frees the same multi-megabyte blocks every time (the
    ``[B, M]`` negatives, the dense user-table gradient, the L2 rows, ...). With glibc's
    defaults a freed block above the mmap threshold is unmapped and the top of the heap is
    trimmed, so the next step page-faults the same memory in again: about 800 page faults
    per step at the paper's MF shape, ~1 s of an epoch. This sets (``mallopt(3)``)
    ``M_MMAP_THRESHOLD`` to ``mmap_threshold`` bytes (allocations below it come from the
    heap) and ``M_TRIM_THRESHOLD`` to ``trim_threshold`` bytes (free heap memory up to it
    stays mapped): ~65 faults per step. It affects the whole process, which then keeps
    its peak heap resident (as jemalloc or tcmalloc do, which PyTorch's CPU tuning guide
    suggests preloading instead). The :class:`Trainer` calls it on CPU unless the
    environment sets ``ADAPTAU_KEEP_FREED_HEAP=0``.
    """
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, int(mmap_threshold))) and bool(
        libc.mallopt(m_trim_threshold, int(trim_threshold))
    )
