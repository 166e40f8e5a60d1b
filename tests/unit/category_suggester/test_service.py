"""The service's start and shutdown: whatever fails, every part started is released, in
reverse start order, and a close that raises keeps none of the later ones from running.

The parts are the real ones (health server on a free port, decoder threads, fetcher,
batcher, librdkafka consumer and producer) except Triton, which is a fake client; the
Kafka bootstrap address has no broker behind it, which none of these tests needs.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from confluent_kafka import Consumer

from category_suggester.batch import Batcher
from category_suggester.consume import KafkaSource
from category_suggester.delivery import Delivery
from category_suggester.errors import InferenceUnavailableError, PublishFatalError
from category_suggester.events import EventCodec
from category_suggester.fetch import ImageFetcher
from category_suggester.health import HealthServer
from category_suggester.infer import ModelInfo, TritonClassifier
from category_suggester.preprocess import Decoder
from category_suggester.service import Parts, Service
from category_suggester.settings import Settings
from tests.support.triton import FakeTriton


class StartFailedError(Exception):
    """Raised by the start step a test picks."""


class CloseFailedError(Exception):
    """Raised by the close a test picks, after the part closed."""


# Where each start step fails, and what is closed then (what started before it, plus the
# part of that step when it exists by then), in the order it must be closed.
RELEASED_ON_FAILURE = {
    "health": [],
    "classifier": ["classifier", "health"],
    "codec": ["classifier", "health"],
    "decoder": ["classifier", "health"],
    "fetcher": ["decoder", "classifier", "health"],
    "batcher": ["fetcher", "decoder", "classifier", "health"],
    "source": ["batcher", "fetcher", "decoder", "classifier", "health"],
    "delivery": ["source", "batcher", "fetcher", "decoder", "classifier", "health"],
    "running": [
        "source.stop_polling",
        "delivery.finish",
        "delivery",
        "source",
        "batcher",
        "fetcher",
        "decoder",
        "classifier",
        "health",
    ],
}
SHUTDOWN = RELEASED_ON_FAILURE["running"]


class RecordingParts(Parts):
    """The service's parts, each close (and the drain's calls) recorded in `closed`.

    `fail_at`: the start step that raises `StartFailedError`; `fail_close`: the part whose close
    raises `CloseFailedError` once the part is closed.
    """

    def __init__(
        self, settings: Settings, *, fail_at: str | None = None, fail_close: str | None = None
    ) -> None:
        super().__init__(settings)
        self.fail_at = fail_at
        self.fail_close = fail_close
        self.triton = FakeTriton()
        self.closed: list[str] = []
        self.consumers: list[Consumer] = []
        self.made: dict[str, Any] = {}
        self.health_port = 0
        self.final_offsets: list[dict[tuple[str, int], int]] = []

    def _record(self, name: str, part: Any, method: str, label: str | None = None) -> None:
        """Record calls of `part.method` under `label` (default `name`)."""
        original: Callable[..., Any] = getattr(part, method)
        label = label or name
        closed, fail_close = self.closed, self.fail_close

        if inspect.iscoroutinefunction(original):

            async def async_recorded(*args: Any) -> Any:
                closed.append(label)
                result = await original(*args)
                if label == fail_close:
                    raise CloseFailedError(label)
                return result

            setattr(part, method, async_recorded)
        else:

            def recorded(*args: Any) -> Any:
                closed.append(label)
                result = original(*args)
                if label == fail_close:
                    raise CloseFailedError(label)
                return result

            setattr(part, method, recorded)

    def _made(
        self, name: str, part: Any, close: str | None, start: str | None = None, step: str = ""
    ) -> Any:
        """Record the part's close; make its start method raise when its start `step`
        (default: `name`) is `fail_at`."""
        self.made[name] = part
        if close is not None:
            self._record(name, part, close)
        step = step or name
        if start is not None and self.fail_at == step:

            def failing(*args: Any, **kwargs: Any) -> Any:
                raise StartFailedError(step)

            setattr(part, start, failing)
        return part

    def _maybe_fail(self, name: str) -> None:
        if self.fail_at == name:
            raise StartFailedError(name)

    def health(self, **checks: Any) -> HealthServer:
        health = super().health(**checks)
        start = health.start

        async def starting() -> None:
            await start()
            self.health_port = health.port  # bound to a free one

        health.start = starting  # type: ignore[method-assign]
        return self._made("health", health, "close", start="start")  # type: ignore[no-any-return]

    def classifier(self, *, stop: asyncio.Event) -> TritonClassifier:
        triton = self.settings.triton
        classifier = TritonClassifier(triton, self.metrics, client=self.triton, stop=stop)
        return self._made("classifier", classifier, "aclose", start="connect")  # type: ignore[no-any-return]

    def codec(self) -> EventCodec:
        return self._made("codec", super().codec(), None, start="prepare")  # type: ignore[no-any-return]

    def decoder(self) -> Decoder:
        self._maybe_fail("decoder")
        return self._made("decoder", super().decoder(), "close")

    def fetcher(self) -> ImageFetcher:
        self._maybe_fail("fetcher")
        return self._made("fetcher", super().fetcher(), "aclose")

    def batcher(self, classifier: TritonClassifier, model: ModelInfo) -> Batcher:
        self._maybe_fail("batcher")
        return self._made("batcher", super().batcher(classifier, model), "aclose")

    def source(self, *, on_refused: Callable[[str], None]) -> KafkaSource:
        self._maybe_fail("source")

        def consumer(conf: dict[str, Any]) -> Consumer:
            self.consumers.append(Consumer(conf))
            return self.consumers[-1]

        source = KafkaSource(
            self.settings, self.metrics, consumer_factory=consumer, on_refused=on_refused
        )
        close = source.close

        async def closing(final_offsets: dict[tuple[str, int], int]) -> None:
            self.final_offsets.append(dict(final_offsets))
            await close(final_offsets)

        source.close = closing  # type: ignore[method-assign]
        self._record("source", source, "stop_polling", "source.stop_polling")
        return self._made("source", source, "close", start="start", step="running")  # type: ignore[no-any-return]

    async def delivery(self, source: Any, **kwargs: Any) -> Delivery:
        self._maybe_fail("delivery")
        delivery = await super().delivery(source, **kwargs)
        self._record("delivery", delivery, "finish", "delivery.finish")
        return self._made("delivery", delivery, "close")  # type: ignore[no-any-return]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:9", "input_topic": "in"},
        "observability": {"host": "127.0.0.1", "port": 0},
        "triton": {"ready_timeout_s": 5.0, "retry_backoff_base_s": 0.01},
        "consumer": {"shutdown_grace_s": 1.0},
    }
    return Settings(**(values | overrides))


def refused(port: int) -> bool:
    """Whether nothing listens on the port any more."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


async def run_until_shutdown(service: Service) -> None:
    """Start the service; shutdown was asked for already, so it drains once started."""
    service.request_shutdown()
    await asyncio.wait_for(service.run(), 60)


async def test_a_clean_shutdown_drains_then_closes_in_reverse_start_order() -> None:
    parts = RecordingParts(settings())
    await run_until_shutdown(Service(parts))
    assert parts.closed == SHUTDOWN
    assert parts.final_offsets == [{}]
    assert refused(parts.health_port)
    assert parts.triton.closed
    with pytest.raises(RuntimeError):  # librdkafka's handle is gone
        parts.consumers[0].assignment()


@pytest.mark.parametrize("step", list(RELEASED_ON_FAILURE))
async def test_a_failing_start_step_releases_what_started_before_it(step: str) -> None:
    parts = RecordingParts(settings(), fail_at=step)
    with pytest.raises(StartFailedError, match=step):
        await run_until_shutdown(Service(parts))
    assert parts.closed == RELEASED_ON_FAILURE[step]
    steps = list(RELEASED_ON_FAILURE)
    later = {"classifier", "codec", "decoder", "fetcher", "batcher", "source", "delivery"}
    later &= set(steps[steps.index(step) + 1 :])
    assert not later & set(parts.made), "no part after the failing step is made"


async def test_a_failing_triton_connect_closes_the_channel_and_the_health_port() -> None:
    parts = RecordingParts(settings(triton={"ready_timeout_s": 0.05, "retry_backoff_base_s": 0.01}))
    parts.triton.live = False
    with pytest.raises(InferenceUnavailableError):
        await run_until_shutdown(Service(parts))
    assert parts.triton.closed
    assert refused(parts.health_port)
    assert parts.closed == ["classifier", "health"]


async def test_a_failing_producer_registration_closes_the_consumer_and_every_earlier_part() -> None:
    # exactly-once: init_transactions cannot finish without a broker.
    parts = RecordingParts(
        settings(
            delivery="exactly_once",
            kafka={
                "bootstrap_servers": "127.0.0.1:9",
                "input_topic": "in",
                "transaction_timeout_ms": 1000,
            },
        )
    )
    with pytest.raises(PublishFatalError):
        await run_until_shutdown(Service(parts))
    assert parts.closed == RELEASED_ON_FAILURE["delivery"]
    with pytest.raises(RuntimeError):
        parts.consumers[0].assignment()
    with pytest.raises(RuntimeError, match="closed"):
        await parts.made["batcher"].submit(np.zeros((112, 112, 3), np.uint8))
    with pytest.raises(RuntimeError, match="closed"):
        await parts.made["decoder"].decode(b"", 112)
    assert parts.triton.closed
    assert refused(parts.health_port)


@pytest.mark.parametrize("part", ["delivery", "source", "batcher", "classifier"])
async def test_a_raising_close_keeps_none_of_the_later_closes_from_running(part: str) -> None:
    parts = RecordingParts(settings(), fail_close=part)
    with pytest.raises(CloseFailedError, match=part):
        await run_until_shutdown(Service(parts))
    assert parts.closed == SHUTDOWN
    assert refused(parts.health_port)
    assert parts.triton.closed
