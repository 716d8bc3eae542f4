"""Keep memory flat while multi-MiB chunk buffers churn through several threads.

glibc raises its mmap threshold dynamically: after the first freed 8 MiB buffer, later ones
come from per-thread heap arenas, which fragment and are not returned to the system, so RSS
can climb to hundreds of MiB under load even though only a few chunks are alive at a time.
Pinning the threshold makes every buffer over 1 MiB its own mapping, released on free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 20


@functools.cache
def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (once per process); False where that is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES))
