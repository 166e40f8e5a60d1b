"""Decode image files one after another and report each decode's cost, as JSON lines.

    python -m tests.corpus.measure_decode SIZE MAX_PIXELS MAX_PIXELS_LOSSLESS FILE...

For each file: {"file", "outcome" (SUGGESTED or the ImageDecodeError reason), "cpu_s" (this
thread's CPU time in the decode), "wall_s", "rss_growth" (the process's peak resident
memory so far, less its resident memory before the first decode, in bytes)}. Run in a
fresh process so the peak belongs to the decodes; run one file per process to attribute
the peak to that file.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from PIL import Image

from category_suggester.errors import ImageDecodeError
from category_suggester.preprocess import decode_image
from tests.corpus import SUGGESTED


def _status_kib(field: str) -> int:
    # VmHWM, not getrusage's ru_maxrss: after fork and exec, ru_maxrss still counts the
    # parent's peak; the peak of this process's own memory starts afresh.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str]) -> None:
    size, max_pixels, max_pixels_lossless, *files = argv
    limits = {"max_pixels": int(max_pixels), "max_pixels_lossless": int(max_pixels_lossless)}
    blobs = [(name, Path(name).read_bytes()) for name in files]
    # A warm-up decode: first-use allocations (plugins, numpy) are not the image's cost.
    warm = io.BytesIO()
    Image.new("RGB", (64, 48)).save(warm, "PNG")
    decode_image(warm.getvalue(), size=int(size), **limits)
    baseline = _status_kib("VmRSS")
    for name, data in blobs:
        cpu, wall = time.thread_time(), time.perf_counter()
        try:
            decode_image(data, size=int(size), **limits)
            outcome = SUGGESTED
        except ImageDecodeError as exc:
            outcome = exc.reason
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        peak = _status_kib("VmHWM")
        print(
            json.dumps(
                {
                    "file": name,
                    "outcome": outcome,
                    "cpu_s": cpu,
                    "wall_s": wall,
                    "rss_growth": peak - baseline,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
