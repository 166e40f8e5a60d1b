"""limit_arenas: threads started after it share at most that many glibc malloc arenas."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from category_suggester.malloc import limit_arenas
from tests.support.python import run_python

# Starts 6 threads that each malloc (a 1000-byte bytearray is above pymalloc's 512-byte
# limit) and stay alive, then counts the arenas in glibc's malloc_info report.
_PROBE = """
import ctypes, ctypes.util, sys, threading
from category_suggester.malloc import limit_arenas
if sys.argv[1] == "limit":
    assert limit_arenas(2)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
ready, done = threading.Barrier(7), threading.Event()
def work():
    keep = [bytearray(1000) for _ in range(100)]
    ready.wait()
    done.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
ready.wait()
fp = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
done.set()
for t in threads:
    t.join()
"""


def arenas(mode: str, tmp_path: Path) -> int:
    report = tmp_path / f"{mode}.xml"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    run_python("-c", _PROBE, mode, str(report), env=env, timeout_s=60)
    return report.read_text().count("<heap nr=")


def test_threads_share_at_most_the_limit_of_arenas(tmp_path: Path) -> None:
    assert arenas("limit", tmp_path) <= 2
    assert arenas("default", tmp_path) > 2  # the probe would see the difference


def test_an_operators_own_setting_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_arenas() is False
