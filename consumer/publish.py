"""Last step: publish suggestions and dead-letter records to Kafka.

Takes: a topic, key, value bytes and headers. `publish` returns once the broker has
acknowledged the record (acks=all, idempotent producer), so the caller may then store the
input offset. Raises `PublishError` when the broker refuses it for good (delivery timeout,
unknown topic, not authorised); the caller keeps the input offset unstored and retries.

A thread of its own serves the producer's delivery reports and resolves the asyncio
futures on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from consumer.errors import PublishError
from consumer.settings import Settings

log = logging.getLogger(__name__)

Headers = Sequence[tuple[str, bytes]]


def producer_config(settings: Settings) -> dict[str, Any]:
    conf = settings.kafka.common_config()
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "compression.type": "lz4",
            # A record not acknowledged within this time fails; the event is retried.
            "delivery.timeout.ms": 30_000,
        }
    )
    conf.update(settings.kafka.extra)
    return conf


class Publisher:
    """An idempotent producer whose sends are awaitable."""

    POLL_TIMEOUT_S = 0.1

    def __init__(
        self,
        settings: Settings,
        *,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
    ) -> None:
        self._producer = producer_factory(producer_config(settings))
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kafka-producer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def publish(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers = ()
    ) -> None:
        assert self._loop is not None, "start() first"
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, future, err)

        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=list(headers), on_delivery=on_delivery
                )
                break
            except BufferError:
                # The local queue is full: wait for deliveries to make room.
                await asyncio.to_thread(self._producer.poll, self.POLL_TIMEOUT_S)
        await future

    async def flush(self, timeout_s: float) -> int:
        """Wait for outstanding deliveries; return how many are still not acknowledged."""
        remaining: int = await asyncio.to_thread(self._producer.flush, timeout_s)
        return remaining

    async def close(self, timeout_s: float = 10.0) -> None:
        remaining = await self.flush(timeout_s)
        if remaining:
            log.error("producer closed with unacknowledged records", extra={"count": remaining})
        self._closed.set()
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._producer.poll(self.POLL_TIMEOUT_S)


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        reason = "publish_fatal" if err.fatal() else "publish_failed"
        future.set_exception(PublishError(f"delivery failed: {err.str()}", reason=reason))
