"""glibc malloc: at most two arenas, set before the service starts its threads.

glibc gives threads malloc arenas of their own, up to eight per core, and an arena keeps
the pages of what was freed in it. The decode threads allocate and free multi-megabyte
buffers for every full-size image, and over a saturated 10-minute soak the service's RSS
rose in steps (+85 MB at 6ada528, bench/PERFORMANCE.md); with two arenas
(`MALLOC_ARENA_MAX=2`) the same soak was flat (+0.4 MB) at the same throughput. An
operator's own `MALLOC_ARENA_MAX` is left as it is. Does nothing off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["limit_arenas"]

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_arenas(count: int = 2) -> bool:
    """Cap glibc's malloc arenas at `count` for threads started from now on; True if set."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_ARENA_MAX, count))
