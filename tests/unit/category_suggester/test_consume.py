"""KafkaSource against a fake librdkafka consumer: how it polls and hands messages over."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import OFFSET_INVALID, KafkaError, KafkaException, TopicPartition
from prometheus_client import CollectorRegistry

from category_suggester.consume import KafkaSource, Partition
from category_suggester.metrics import Metrics
from category_suggester.settings import ConsumerSettings, Settings


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


@dataclass(frozen=True)
class UnreadOffset:
    """A committed offset librdkafka could not read (TopicPartition's error is read-only)."""

    topic: str
    partition: int
    offset: int
    error: KafkaError


class BatchWaitingConsumer:
    """Behaves like librdkafka's batch consume: returns at once only when the whole batch
    is there (or the timeout is 0); otherwise it waits for the timeout. Instead of
    sleeping, this fake adds up the time it would have held messages it already had."""

    def __init__(self, available: int) -> None:
        self.total = available
        self.available = [FakeMessage(i) for i in range(available)]
        self.held_s = 0.0
        self.lock = threading.Lock()
        self.on_assign: Any = None
        self.assigned = False
        self.paused = False
        self.pauses = 0
        self.stored: list[TopicPartition] = []
        self.stored_event = threading.Event()
        self.polls_while_paused = 0
        self.paused_polls = threading.Event()
        # Set by a test: partitions assigned at the next poll (a rebalance).
        self.assign_next: list[TopicPartition] = []
        self.reassigned = threading.Event()
        # Set by a test: errors that the next reads of committed offsets come back with.
        self.committed_errors: list[KafkaError] = []
        self.seeks: list[int] = []

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.on_assign = callbacks["on_assign"]

    def pause(self, partitions: list[Any]) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self, partitions: list[Any]) -> None:
        self.paused = False

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        if not self.assigned:
            self.assigned = True
            self.on_assign(self, [TopicPartition("in", 0)])
            return []
        if self.assign_next:
            more, self.assign_next = self.assign_next, []
            self.on_assign(self, more)
            self.reassigned.set()
            return []
        with self.lock:
            if self.paused:  # a paused partition yields nothing
                self.polls_while_paused += 1
                if self.polls_while_paused >= 3:
                    self.paused_polls.set()
                return []
            if 0 < len(self.available) < num_messages:
                self.held_s += timeout
            taken, self.available = self.available[:num_messages], self.available[num_messages:]
            return taken

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        self.stored += offsets
        self.stored_event.set()

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        if self.committed_errors:
            # As librdkafka answers a partition it could not read: no offset, an error.
            error = self.committed_errors.pop(0)
            return [
                UnreadOffset(tp.topic, tp.partition, OFFSET_INVALID, error)  # type: ignore[misc]
                for tp in partitions
            ]
        return [TopicPartition(tp.topic, tp.partition, 0) for tp in partitions]

    def seek(self, position: TopicPartition) -> None:
        self.seeks.append(position.offset)
        with self.lock:
            self.available = [FakeMessage(i) for i in range(position.offset, self.total)]

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

    def expect(self, count: int) -> asyncio.Event:
        self.expected = count
        self.all_there.clear()
        if len(self.offsets) >= count:
            self.all_there.set()
        return self.all_there

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        pass

    async def on_revoked(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        return {}

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        pass


def started_source(
    fake: BatchWaitingConsumer,
    handler: Handler,
    consumer: ConsumerSettings,
    pause_after_s: float = KafkaSource.PAUSE_AFTER_S,
) -> KafkaSource:
    source = KafkaSource(
        Settings(consumer=consumer),
        Metrics(CollectorRegistry()),
        consumer_factory=lambda _conf: fake,  # type: ignore[arg-type,return-value]
    )
    source.PAUSE_AFTER_S = pause_after_s
    source.start(handler)
    return source


async def backlog_at_the_mark(
    pause_after_s: float,
) -> tuple[BatchWaitingConsumer, Handler, KafkaSource]:
    """A source over a backlog whose window (10 in flight, resume at 5) has just filled."""
    fake = BatchWaitingConsumer(available=1000)
    handler = Handler(expected=10)
    marks = ConsumerSettings(max_inflight=10, resume_inflight=5, poll_batch=4)
    source = started_source(fake, handler, marks, pause_after_s=pause_after_s)
    try:
        await asyncio.wait_for(handler.all_there.wait(), timeout=10)
    except BaseException:
        await source.close({})
        raise
    return fake, handler, source


async def test_messages_already_fetched_are_handed_over_without_waiting_for_a_full_batch() -> None:
    fake = BatchWaitingConsumer(available=3)
    handler = Handler(expected=3)
    source = started_source(fake, handler, ConsumerSettings(poll_batch=500))
    try:
        await asyncio.wait_for(handler.all_there.wait(), timeout=10)
    finally:
        await source.close({})
    assert handler.offsets == [0, 1, 2]
    assert fake.held_s == 0.0


async def test_a_rewind_runs_then_between_the_reads_before_the_seek_and_after_it() -> None:
    # The pipeline ignores messages while it rewinds and takes them again in `then`: a
    # message read after the seek but handed over before `then` would be lost.
    fake = BatchWaitingConsumer(available=5)
    handler = Handler(expected=5)
    source = started_source(fake, handler, ConsumerSettings(poll_batch=500))
    handed_at_then: list[int] = []
    try:
        await asyncio.wait_for(handler.all_there.wait(), timeout=10)
        await source.rewind(then=lambda: handed_at_then.append(len(handler.offsets)))
        await asyncio.wait_for(handler.expect(10).wait(), timeout=10)
    finally:
        await source.close({})
    assert handed_at_then == [5]
    assert handler.offsets == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]


async def test_a_committed_offset_read_with_an_error_fails_the_rewind_and_seeks_nothing() -> None:
    # Taken for "nothing committed", the partition would be replayed from its beginning.
    fake = BatchWaitingConsumer(available=5)
    handler = Handler(expected=5)
    source = started_source(fake, handler, ConsumerSettings(poll_batch=500))
    fake.committed_errors = [KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, "loading")]
    then_ran: list[bool] = []
    try:
        await asyncio.wait_for(handler.all_there.wait(), timeout=10)
        with pytest.raises(KafkaException, match="loading"):
            await source.rewind(then=lambda: then_ran.append(True))
        assert fake.seeks == []
        assert then_ran == []
        # Tried again, it reads the committed offset and seeks there.
        await source.rewind(then=lambda: then_ran.append(True))
        assert fake.seeks == [0]
        assert then_ran == [True]
    finally:
        await source.close({})


async def test_at_the_mark_the_source_waits_for_credit_without_pausing() -> None:
    # Pausing throws librdkafka's prefetched messages away: a pipeline that releases soon
    # after the window filled must find them still there.
    fake, handler, source = await backlog_at_the_mark(pause_after_s=60)
    try:
        source.store({("in", 0): 3})  # a request is served while the source waits
        await asyncio.wait_for(asyncio.to_thread(fake.stored_event.wait), timeout=10)
        assert handler.offsets == list(range(10))
        source.release(4)  # 6 outstanding: above the resume mark, still waiting
        source.release(1)  # 5: at the resume mark
        await asyncio.wait_for(handler.expect(15).wait(), timeout=10)
    finally:
        await source.close({})
    assert handler.offsets[:15] == list(range(15))
    assert fake.stored == [TopicPartition("in", 0, 3)]
    assert fake.pauses == 0


async def test_no_more_than_max_inflight_is_handed_over_until_some_is_released() -> None:
    # A backlog: every poll could return a full batch. The loop has not released anything.
    fake, handler, source = await backlog_at_the_mark(pause_after_s=0.05)
    try:
        # Still full after PAUSE_AFTER_S: paused, and polling on (serving the group)
        # without handing more.
        await asyncio.wait_for(asyncio.to_thread(fake.paused_polls.wait), timeout=10)
        await asyncio.sleep(0)
        assert handler.offsets == list(range(10))
        # A rebalance while paused: the new partition waits with the others.
        fake.assign_next = [TopicPartition("in", 1)]
        await asyncio.wait_for(asyncio.to_thread(fake.reassigned.wait), timeout=10)
        source.release(4)  # 6 outstanding: above the resume mark
        source.release(1)  # 5: at the resume mark
        await asyncio.wait_for(handler.expect(15).wait(), timeout=10)
    finally:
        await source.close({})
    assert handler.offsets[:15] == list(range(15))
