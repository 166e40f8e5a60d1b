"""The pipeline under test with fakes for its I/O steps (fetch, decode, infer), shared by
its unit tests in both delivery modes (tests/unit/category_suggester/test_app*.py).

`pipeline_settings` and `make_pipeline` build a pipeline on the topics `in`, `out` and
`dlq` with millisecond retries; `message` makes an input record; each test module brings
its delivery mode's fake (a publisher, or transactions) and a source (`FakeSource`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np
from confluent_kafka import Message
from prometheus_client import CollectorRegistry

from category_suggester.app import Pipeline
from category_suggester.batch import BatchResult
from category_suggester.delivery import Delivery
from category_suggester.errors import FetchRefusedError, InferenceUnavailableError, SuggesterError
from category_suggester.events import EventCodec
from category_suggester.fetch import FetchedImage
from category_suggester.infer import ModelInfo
from category_suggester.metrics import Metrics
from category_suggester.settings import Settings
from tests.support.kafka import make_event

LABELS = ("books", "car", "furniture", "mobile", "motorcycle")
MODEL = ModelInfo("category_classifier", "3", 8, 4, LABELS)
CODEC = EventCodec()
TOPIC = "in"

D = TypeVar("D", bound=Delivery)


def pipeline_settings(**fields: Any) -> Settings:
    """Settings on the topics in, out and dlq, Kafka and Triton retried after a millisecond
    or two; `fields` add to or replace the top-level ones."""
    fast = {"retry_backoff_base_s": 0.001, "retry_backoff_max_s": 0.002}
    values: dict[str, Any] = {
        "kafka": {"input_topic": TOPIC, "output_topic": "out", "dlq_topic": "dlq"} | fast,
        "triton": fast,
    }
    return Settings(**(values | fields))


def message(
    offset: int,
    url: str = "http://origin/a.jpg",
    partition: int = 0,
    headers: Sequence[tuple[str, bytes]] = (),
) -> Message:
    """An input record at `offset` holding a fresh event for `url`."""
    event = make_event(url, uploaded_at=datetime.now(UTC))
    return Message(
        topic=TOPIC, partition=partition, offset=offset, key=event.listing_id.encode(),
        value=CODEC.encode_uploaded(event), headers=list(headers),
    )  # fmt: skip


def make_pipeline(
    settings: Settings,
    delivery: Callable[[Metrics, asyncio.Event], D],
    source: FakeSource,
    *,
    fetcher: GatedFetcher | None = None,
    batcher: FakeBatcher | None = None,
    on_fatal: Callable[[SuggesterError], None] = lambda exc: None,
) -> tuple[Pipeline, D, Metrics]:
    """A pipeline with the fakes below, handing its events back to `source`;
    `delivery(metrics, stop)` builds its delivery."""
    metrics = Metrics(CollectorRegistry())
    stop = asyncio.Event()
    bound = delivery(metrics, stop)
    pipeline = Pipeline(
        settings,
        metrics,
        codec=CODEC,
        fetcher=fetcher or GatedFetcher(),  # type: ignore[arg-type]
        decoder=FakeDecoder(),  # type: ignore[arg-type]
        batcher=batcher or FakeBatcher(),  # type: ignore[arg-type]
        delivery=bound,
        source=source,  # type: ignore[arg-type]
        model=MODEL,
        stop=stop,
        on_fatal=on_fatal,
    )
    return pipeline, bound, metrics


@dataclass
class FakeSource:
    """The consumer side the pipeline hands events back to: stored offsets are recorded,
    released events counted."""

    stored: list[dict[tuple[str, int], int]] = field(default_factory=list)
    released: int = 0

    def store(self, offsets: dict[tuple[str, int], int]) -> None:
        self.stored.append(dict(offsets))

    def release(self, count: int) -> None:
        self.released += count


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
