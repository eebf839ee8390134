"""Host-memory measurement shared by the benchmark scripts (Linux ``/proc``).

Peak growth of a call = ``VmHWM`` after it minus ``VmRSS`` before it, with the high-water
mark reset through ``/proc/self/clear_refs`` and freed heap returned by glibc's
``malloc_trim`` first, so memory freed earlier is not counted.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Callable, Optional

_libc = None


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS."""
    global _libc
    gc.collect()
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _read_kib(path: str, key: str) -> Optional[int]:
    """``key``'s value in bytes from a ``/proc`` file of ``Name: N kB`` lines."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_growth(fn: Callable[[], None]) -> Optional[float]:
    """Bytes by which the peak RSS during ``fn()`` exceeds the RSS before it (None: unsupported)."""
    trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    rss0 = _read_kib("/proc/self/status", "VmRSS:") or 0
    fn()
    return float(max(0, (_read_kib("/proc/self/status", "VmHWM:") or 0) - rss0))


def available_bytes() -> float:
    """MemAvailable of the machine (8 GiB when it cannot be read)."""
    value = _read_kib("/proc/meminfo", "MemAvailable:")
    return float(value if value is not None else 8 * 2**30)
