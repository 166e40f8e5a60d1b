"""Fakes for the pipeline's I/O steps (fetch, decode, infer), shared by its unit tests in
both delivery modes (tests/unit/consumer/test_app*.py)."""

from __future__ import annotations

import asyncio

import numpy as np

from consumer.batch import BatchResult
from consumer.errors import FetchRefusedError, InferenceUnavailableError
from consumer.events import EventCodec
from consumer.fetch import FetchedImage
from consumer.infer import ModelInfo

LABELS = ("books", "car", "furniture", "mobile", "motorcycle")
MODEL = ModelInfo("category_classifier", "3", 8, 4, LABELS)
CODEC = EventCodec()


class GatedFetcher:
    """Fetches wait for their URL's gate, when it has one; `http://refused...` URLs are bad
    input (a policy refusal). Every URL asked for is recorded in `fetched`."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.fetched: list[str] = []

    async def fetch(self, url: str) -> FetchedImage:
        self.fetched.append(url)
        if url.startswith("http://refused"):
            raise FetchRefusedError("private address", reason="address_refused")
        if url in self.gates:
            await self.gates[url].wait()
        return FetchedImage(
            data=b"\xff\xd8\xff", format="JPEG", final_url=url, status=200, attempts=1,
            redirects=0, elapsed_s=0.01,
        )  # fmt: skip


class FakeDecoder:
    async def decode(self, data: bytes, size: int) -> tuple[np.ndarray, float]:
        return np.zeros((size, size, 3), np.uint8), 0.001


class FakeBatcher:
    """Answers "car" at 0.6; the first `failures` calls find Triton down."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0

    async def submit(self, image: np.ndarray) -> BatchResult:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise InferenceUnavailableError("triton down")
        probabilities = np.array([0.1, 0.6, 0.1, 0.1, 0.1], np.float32)
        return BatchResult(probabilities, queue_s=0.002, infer_s=0.01, batch_size=1)
