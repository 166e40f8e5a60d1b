"""Where a consumer's CPU per event goes, measured piece by piece in the harness.

The overhead run gives the service's CPU per event as a whole (from /proc); this breaks
it down by running the service's own components here, on one thread, and timing them with
`time.thread_time()`:

- `fetch`: `category_suggester.fetch.ImageFetcher` GETting a tiny image from the origin (no latency)
  with `concurrency` requests in flight and as many pooled connections, for each
  concurrency of a small sweep (the service's default is 64 of each);
- `event_decode`: `EventCodec.decode_uploaded` of one event;
- `suggestion_encode`: postprocess one probability row, build the suggestion record and
  encode it, as the service does (`category_suggester.postprocess.suggestion_record`);
- `decode_tiny`: `decode_image` of a tiny image.

These are lower bounds of the service's costs (no contention, warm caches); their sum
against the overhead run's CPU per event shows what the wiring itself adds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import numpy as np

from category_suggester.events import EventCodec, ListingImageUploaded
from category_suggester.fetch import ImageFetcher
from category_suggester.postprocess import postprocess, suggestion_record
from category_suggester.settings import FetchSettings

_LABELS = ("books", "car", "furniture", "mobile", "motorcycle")


async def _fetch_cost(url: str, host_port: str, concurrency: int, requests: int) -> float:
    settings = FetchSettings(
        allowed_hosts=(host_port,), concurrency=concurrency, max_connections=concurrency
    )
    async with ImageFetcher(settings) as fetcher:
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with slots:
                await fetcher.fetch(url)

        # Warm-up: every pooled connection opened before timing starts.
        await asyncio.gather(*(one() for _ in range(concurrency * 2)))
        started = time.thread_time()
        await asyncio.gather(*(one() for _ in range(requests)))
        return (time.thread_time() - started) / requests


def fetch_cpu_us(
    url: str, host_port: str, concurrencies: Sequence[int], requests: int
) -> dict[str, float]:
    """CPU microseconds per fetch of `url` by the service's fetcher, per concurrency."""
    return {
        str(c): round(asyncio.run(_fetch_cost(url, host_port, c, requests)) * 1e6, 1)
        for c in concurrencies
    }


def _per_call_us(fn: Callable[[], object], repeat: int) -> float:
    fn()
    started = time.thread_time()
    for _ in range(repeat):
        fn()
    return round((time.thread_time() - started) / repeat * 1e6, 1)


def codec_cpu_us(repeat: int = 3000) -> dict[str, float]:
    """CPU microseconds of decoding one event and of building and encoding one suggestion."""
    codec = EventCodec()
    event = ListingImageUploaded(
        event_id=uuid.uuid4(),
        listing_id="listing-1",
        image_id="image-1",
        image_url="http://127.0.0.1:1/tiny/000.jpg",
        uploaded_at=datetime.now(UTC),
    )
    raw = codec.encode_uploaded(event)
    row = np.array([0.6, 0.1, 0.1, 0.1, 0.1], dtype=np.float32)

    def suggestion() -> bytes:
        prediction = postprocess(row, _LABELS, 0.5)
        return codec.encode_suggestion_record(
            suggestion_record(
                event,
                prediction,
                threshold=0.5,
                model_name="category_classifier",
                model_version="1",
                fetch_s=0.001,
                preprocess_s=0.001,
                inference_s=0.001,
            )
        )

    return {
        "event_decode": _per_call_us(lambda: codec.decode_uploaded(raw), repeat),
        "suggestion_encode": _per_call_us(suggestion, repeat),
    }
