"""KafkaSource against a fake librdkafka consumer: how it polls and hands messages over."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from consumer.consume import KafkaSource, Partition
from consumer.metrics import Metrics
from consumer.settings import ConsumerSettings, Settings


class FakeMessage:
    def __init__(self, offset: int) -> None:
        self._offset = offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset


class BatchWaitingConsumer:
    """Behaves like librdkafka's batch consume: returns at once only when the whole batch
    is there (or the timeout is 0); otherwise it waits for the timeout. Instead of
    sleeping, this fake adds up the time it would have held messages it already had."""

    def __init__(self, available: int) -> None:
        self.available = [FakeMessage(i) for i in range(available)]
        self.held_s = 0.0
        self.lock = threading.Lock()

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        pass

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        with self.lock:
            if 0 < len(self.available) < num_messages:
                self.held_s += timeout
            taken, self.available = self.available[:num_messages], self.available[num_messages:]
            return taken

    def consumer_group_metadata(self) -> None:
        return None

    def commit(self, asynchronous: bool) -> None:
        pass

    def close(self) -> None:
        pass


class Handler:
    def __init__(self, expected: int) -> None:
        self.offsets: list[int] = []
        self.expected = expected
        self.all_there = asyncio.Event()

    def on_messages(self, messages: Sequence[Any]) -> None:
        self.offsets += [m.offset() for m in messages]
        if len(self.offsets) >= self.expected:
            self.all_there.set()

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        pass

    async def on_revoked(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        return {}

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        pass


async def test_messages_already_fetched_are_handed_over_without_waiting_for_a_full_batch() -> None:
    fake = BatchWaitingConsumer(available=3)
    handler = Handler(expected=3)
    settings = Settings(consumer=ConsumerSettings(poll_batch=500))
    source = KafkaSource(
        settings,
        Metrics(CollectorRegistry()),
        handler,
        consumer_factory=lambda _conf: fake,  # type: ignore[arg-type,return-value]
    )
    source.start()
    try:
        await asyncio.wait_for(handler.all_there.wait(), timeout=10)
    finally:
        await source.close({})
    assert handler.offsets == [0, 1, 2]
    assert fake.held_s == 0.0
