"""Threads the kernel can tell apart: `NamedThread` gives its OS thread its name too.

Python names threads for itself only: to the kernel, `top -H`, /proc/<pid>/task/*/comm and
py-spy's native view, every thread of the service is "python". A `NamedThread` sets its
name in the kernel as well when it starts (Linux `prctl(PR_SET_NAME)`; the kernel keeps
15 bytes), so an operator sees which of them burns CPU, and the benchmark measures the
decode threads' CPU apart from the rest. Elsewhere it is a plain thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Any

__all__ = ["NamedThread", "set_os_thread_name"]

_PR_SET_NAME = 15

_prctl: Any
try:
    _prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: names stay Python's own
    _prctl = None


def set_os_thread_name(name: str) -> None:
    """Name the calling thread in the kernel (first 15 bytes); does nothing off Linux."""
    if _prctl is not None:
        _prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:15], 0, 0, 0)


class NamedThread(threading.Thread):
    """A `threading.Thread` whose OS thread carries its `name`."""

    def run(self) -> None:
        set_os_thread_name(self.name)
        super().run()
