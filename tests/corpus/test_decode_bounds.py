"""Every corpus image decodes (or is refused) in bounded time and memory.

Each decode runs in a fresh process (tests/corpus/measure_decode.py) so its peak resident
memory is its own. Time is the decode's own CPU time, which load on the machine does not
inflate; the wall time is reported beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from category_suggester.preprocess import ACCEPTED_FORMATS, sniff_format
from category_suggester.settings import DecodeSettings
from tests.corpus import SUGGESTED
from tests.corpus.images import WORST_CASES, ImageCase, image_cases, worst_case_image
from tests.support.python import run_python

SIZE = 112
MAX_PIXELS = DecodeSettings().max_pixels
MAX_PIXELS_LOSSLESS = DecodeSettings().max_pixels_lossless
CPU_BOUND_S = 2.0
# Above the process's resident memory before the decode: the consumer's pod limit
# (deploy/k8s/base: 1 GiB). The largest allowed images come close (a 40 MP RGBA WebP: about
# 800 MiB), so decode.threads and decode.max_pixels must be sized together.
RSS_BOUND = 1024 * 1024 * 1024


def measure(files: list[Path], lossless_limit: int = MAX_PIXELS_LOSSLESS) -> list[dict[str, Any]]:
    limits = [str(SIZE), str(MAX_PIXELS), str(lossless_limit)]
    files_args = [str(f) for f in files]
    result = run_python("-m", "tests.corpus.measure_decode", *limits, *files_args)
    return [json.loads(line) for line in result.stdout.splitlines()]


def decoded(cases: list[ImageCase], folder: Path) -> list[tuple[ImageCase, Path]]:
    """The cases that reach the decoder (the fetch step refuses the others by magic)."""
    out = []
    for case in cases:
        if sniff_format(case.data[:1024]) in ACCEPTED_FORMATS:
            path = folder / case.name.replace("/", "_")
            path.write_bytes(case.data)
            out.append((case, path))
    return out


def check(case: ImageCase, report: dict[str, Any]) -> list[str]:
    problems = []
    # Outcomes the decoder gives (fetch-level outcomes never reach it).
    expected = case.expect if case.expect == SUGGESTED or case.expect.startswith("image_") else None
    if expected is not None and report["outcome"] != expected:
        problems.append(f"{case.name}: {report['outcome']}, expected {expected}")
    if report["cpu_s"] > CPU_BOUND_S:
        problems.append(f"{case.name}: {report['cpu_s']:.2f} s of CPU ({report['wall_s']:.2f} s)")
    if report["rss_growth"] > RSS_BOUND:
        problems.append(f"{case.name}: peak memory +{report['rss_growth'] / 2**20:.0f} MiB")
    return problems


def test_corpus_images_decode_within_bounds(tmp_path: Path) -> None:
    cases = decoded(list(image_cases()), tmp_path)
    reports = measure([path for _, path in cases])
    assert len(reports) == len(cases)
    problems = [
        p for (case, _), report in zip(cases, reports, strict=True) for p in check(case, report)
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", WORST_CASES)
def test_largest_allowed_images_decode_within_bounds(kind: str, tmp_path: Path) -> None:
    case = worst_case_image(kind)
    ((_, path),) = decoded([case], tmp_path)
    # At the JPEG limit for every format: a bound that still holds if the PNG/WebP limit
    # is raised to it.
    (report,) = measure([path], lossless_limit=MAX_PIXELS)
    assert not check(case, report), check(case, report)
