"""Fuzz target: the image path (`sniff_format`, then `decode_image`), default limits.

    python -m fuzz.images [libFuzzer options] [corpus dirs or files]

Properties, for any bytes: `decode_image` raises nothing but `ImageDecodeError` with a
known reason; whatever it decodes, the fetch step's sniffing also names an accepted
format; the array is uint8 `[S, S, 3]`; one decode takes under 2 s of CPU time.
"""

from __future__ import annotations

import sys
import time

import atheris

with atheris.instrument_imports(include=["category_suggester", "PIL"]):
    import numpy as np

    from category_suggester.errors import ImageDecodeError
    from category_suggester.preprocess import ACCEPTED_FORMATS, decode_image, sniff_format
    from category_suggester.settings import DecodeSettings

SIZE = 112
MAX_PIXELS = DecodeSettings().max_pixels
CPU_BOUND_S = 2.0
REASONS = frozenset({"image_undecodable", "image_too_large", "format_refused"})


def test_one_input(data: bytes) -> None:
    started = time.thread_time()
    try:
        array = decode_image(data, size=SIZE, max_pixels=MAX_PIXELS)
    except ImageDecodeError as exc:
        if exc.reason not in REASONS:
            raise AssertionError(f"unknown decode reason {exc.reason!r}") from exc
        array = None
    spent = time.thread_time() - started
    if spent > CPU_BOUND_S:
        raise AssertionError(f"one decode took {spent:.2f} s of CPU")
    if array is None:
        return
    if sniff_format(data[:1024]) not in ACCEPTED_FORMATS:
        raise AssertionError("decoded bytes the fetch step would not have let through")
    if array.shape != (SIZE, SIZE, 3) or array.dtype != np.uint8:
        raise AssertionError(f"decoded to {array.dtype} {array.shape}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
