"""The pipeline in exactly-once mode, with fakes: transactions in offset order, with offsets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Message

from category_suggester.app import Pipeline
from category_suggester.delivery.exactly_once import ExactlyOnce
from category_suggester.errors import (
    ProducerFailedError,
    PublishError,
    PublishFatalError,
    SuggesterError,
)
from category_suggester.publish import OutputRecord
from category_suggester.settings import ConsumerSettings
from tests.support import pipeline as support
from tests.support.pipeline import CODEC, TOPIC, FakeSource, GatedFetcher, pipeline_settings


@dataclass
class FakeTransactions:
    """Commits are recorded; queued failures are raised first, one per commit."""

    failures: list[PublishError] = field(default_factory=list)
    commits: list[tuple[list[OutputRecord], dict[tuple[str, int], int]]] = field(
        default_factory=list
    )
    attempts: int = 0
    resets: int = 0
    reset_called: asyncio.Event = field(default_factory=asyncio.Event)

    # Set by a test: reset() waits for it (a new producer's registration taking its time).
    reset_gate: asyncio.Event | None = None

    async def reset(self) -> None:
        self.resets += 1
        self.reset_called.set()
        if self.reset_gate is not None:
            await self.reset_gate.wait()

    async def commit(
        self,
        records: Sequence[OutputRecord],
        offsets: Mapping[tuple[str, int], int],
        group_metadata: object,
    ) -> None:
        assert group_metadata == "generation-1"
        self.attempts += 1
        await asyncio.sleep(0)  # a real commit yields to the loop
        if self.failures:
            raise self.failures.pop(0)
        self.commits.append((list(records), dict(offsets)))

    def committed_offsets(self) -> list[int]:
        """Input offsets of the committed suggestions, via their source event ids."""
        return [r for records, _ in self.commits for r in _sources(records)]


SOURCES: dict[str, int] = {}


def _sources(records: Sequence[OutputRecord]) -> list[int]:
    out = []
    for record in records:
        if record.topic == "out":
            out.append(SOURCES[str(CODEC.decode_suggestion(record.value).source_event_id)])
        else:
            out.append(int(dict(record.headers)["dlq.original.offset"]))
    return out


@dataclass
class RewindingSource(FakeSource):
    rewinds: int = 0
    rewound: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by a test: handed over while the rewind is under way (read before the seek), and
    # right after the seek, before the awaiting coroutine resumes (read after it).
    during_rewind: list[Message] = field(default_factory=list)
    after_seek: list[Message] = field(default_factory=list)
    pipeline: Pipeline | None = None

    async def rewind(self, then: Callable[[], None]) -> None:
        self.rewinds += 1
        assert self.pipeline is not None
        self.pipeline.on_messages(self.during_rewind)
        then()
        self.pipeline.on_messages(self.after_seek)
        self.rewound.set()

    def store(self, offsets: dict[tuple[str, int], int]) -> None:
        raise AssertionError("exactly-once never stores offsets in the consumer")

    def group_metadata(self) -> object:
        return "generation-1"


def message(offset: int, url: str, partition: int = 0) -> Message:
    record = support.message(offset, url, partition)
    SOURCES[str(CODEC.decode_uploaded(record.value()).event_id)] = offset
    return record


def make_pipeline(
    transactions: FakeTransactions, fetcher: GatedFetcher, consumer: ConsumerSettings | None = None
) -> tuple[Pipeline, ExactlyOnce, RewindingSource, list[SuggesterError]]:
    settings = pipeline_settings(
        delivery="exactly_once",
        consumer=consumer or ConsumerSettings(transaction_interval_s=0.001),
    )
    fatal: list[SuggesterError] = []
    source = RewindingSource()
    pipeline, delivery, _metrics = support.make_pipeline(
        settings,
        lambda metrics, stop: ExactlyOnce(
            settings,
            metrics,
            transactions,  # type: ignore[arg-type]
            source=source,  # type: ignore[arg-type]
            stop=stop,
            on_fatal=fatal.append,
        ),
        source,
        fetcher=fetcher,
        on_fatal=fatal.append,
    )
    source.pipeline = pipeline
    return pipeline, delivery, source, fatal


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_answers_are_committed_in_offset_order_with_their_offsets() -> None:
    fetcher = GatedFetcher()
    fetcher.gates["http://o/slow.jpg"] = asyncio.Event()
    transactions = FakeTransactions()
    pipeline, delivery, _source, _ = make_pipeline(transactions, fetcher)
    # Offset 10 is slow; 11-13 finish first, 12 is bad input (a DLQ record).
    pipeline.on_messages(
        [
            message(10, "http://o/slow.jpg"),
            message(11, "http://o/a.jpg"),
            message(12, "http://refused/x.jpg"),
            message(13, "http://o/b.jpg"),
        ]
    )
    await settle()
    assert await delivery.commit_answers()
    assert transactions.commits == [], "nothing may be published past an unanswered offset"
    assert pipeline.inflight == 4

    fetcher.gates["http://o/slow.jpg"].set()
    await settle()
    assert await delivery.commit_answers()
    (records, offsets), *_ = transactions.commits
    assert _sources(records) == [10, 11, 12, 13]
    assert [r.topic for r in records] == ["out", "out", "dlq", "out"]
    assert offsets == {(TOPIC, 0): 14}
    assert pipeline.inflight == 0
    assert await pipeline.wait_idle(0.1)


async def test_partitions_commit_independently_in_one_transaction() -> None:
    transactions = FakeTransactions()
    fetcher = GatedFetcher()
    fetcher.gates["http://o/slow.jpg"] = asyncio.Event()
    pipeline, delivery, _source, _ = make_pipeline(transactions, fetcher)
    pipeline.on_messages(
        [
            message(5, "http://o/a.jpg", partition=0),
            message(6, "http://o/slow.jpg", partition=0),
            message(7, "http://o/b.jpg", partition=0),
            message(20, "http://o/c.jpg", partition=1),
        ]
    )
    await settle()
    assert await delivery.commit_answers()
    [(records, offsets)] = transactions.commits
    assert offsets == {(TOPIC, 0): 6, (TOPIC, 1): 21}
    assert sorted(_sources(records)) == [5, 20]
    assert pipeline.inflight == 2  # the slow one, and 7 behind it


async def test_an_aborted_transaction_is_sent_again_and_committed_once() -> None:
    transactions = FakeTransactions(failures=[PublishError("aborted"), PublishError("aborted")])
    pipeline, delivery, _source, fatal = make_pipeline(transactions, GatedFetcher())
    pipeline.on_messages([message(o, f"http://o/{o}.jpg") for o in range(3)])
    await settle()
    assert await delivery.commit_answers()
    assert transactions.attempts == 3
    assert transactions.committed_offsets() == [0, 1, 2]
    assert await delivery.commit_answers()
    assert transactions.committed_offsets() == [0, 1, 2], "committed answers are not resent"
    assert not fatal


async def test_a_fenced_producer_stops_the_service_and_commits_nothing() -> None:
    transactions = FakeTransactions(failures=[PublishFatalError("fenced")])
    pipeline, delivery, _source, fatal = make_pipeline(transactions, GatedFetcher())
    pipeline.on_messages([message(0, "http://o/a.jpg")])
    await settle()
    assert not await delivery.commit_answers()
    assert transactions.commits == []
    assert [type(e) for e in fatal] == [PublishFatalError]


async def test_the_transaction_loop_commits_as_answers_become_ready() -> None:
    transactions = FakeTransactions()
    pipeline, delivery, _source, _ = make_pipeline(transactions, GatedFetcher())
    loop_task = asyncio.create_task(delivery.run_transactions())
    pipeline.on_messages([message(o, f"http://o/{o}.jpg") for o in range(5)])
    assert await pipeline.wait_idle(5)
    delivery.stop_transactions()
    await loop_task
    assert transactions.committed_offsets() == [0, 1, 2, 3, 4]


async def test_revoke_commits_the_moving_partitions_finished_prefix_and_drops_the_rest() -> None:
    fetcher = GatedFetcher()
    fetcher.gates["http://o/stuck.jpg"] = asyncio.Event()
    transactions = FakeTransactions()
    pipeline, _delivery, _source, _ = make_pipeline(
        transactions, fetcher, ConsumerSettings(shutdown_grace_s=0.05)
    )
    pipeline.on_messages(
        [
            message(0, "http://o/a.jpg"),
            message(1, "http://o/stuck.jpg"),
            message(2, "http://o/b.jpg"),
        ]
    )
    await settle()
    assert await pipeline.on_revoked([(TOPIC, 0)]) == {}
    [(records, offsets)] = transactions.commits
    assert _sources(records) == [0]
    assert offsets == {(TOPIC, 0): 1}
    await settle()
    assert pipeline.inflight == 0, "offsets 1 and 2 are left for the partition's next owner"


@pytest.mark.parametrize("lost_during_commit", [False, True])
async def test_uncommitted_answers_hold_back_pressure_until_committed_or_lost(
    lost_during_commit: bool,
) -> None:
    transactions = FakeTransactions()
    pipeline, delivery, source, _ = make_pipeline(
        transactions, GatedFetcher(), ConsumerSettings(max_inflight=4, resume_inflight=1)
    )
    pipeline.on_messages([message(o, f"http://o/{o}.jpg") for o in range(4)])
    await settle()
    assert source.released == 0, "answered but uncommitted events are still in flight"
    if lost_during_commit:
        pipeline.on_lost([(TOPIC, 0)])
    else:
        assert await delivery.commit_answers()
    assert source.released == 4
    assert pipeline.inflight == 0
    assert transactions.committed_offsets() == ([] if lost_during_commit else [0, 1, 2, 3])


async def test_a_broken_producer_is_replaced_and_the_partitions_rewound() -> None:
    transactions = FakeTransactions(failures=[ProducerFailedError("cannot end transaction")])
    pipeline, delivery, source, fatal = make_pipeline(transactions, GatedFetcher())
    loop_task = asyncio.create_task(delivery.run_transactions())
    # Read before the seek: ignored, since whether their answers committed is unknown.
    source.during_rewind = [message(2, "http://o/late.jpg")]
    # Read again from the committed offset after the seek, and handed over before the
    # rewinding coroutine resumes: taken (ignoring them would lose them, since the
    # consumer's position is past them).
    source.after_seek = [message(0, "http://o/a.jpg"), message(1, "http://o/b.jpg")]
    pipeline.on_messages([message(0, "http://o/a.jpg"), message(1, "http://o/b.jpg")])
    await asyncio.wait_for(source.rewound.wait(), 5)
    assert source.rewinds == 1
    assert transactions.resets == 1
    assert await pipeline.wait_idle(5)
    delivery.stop_transactions()
    await loop_task
    assert transactions.committed_offsets() == [0, 1]
    assert not fatal


async def test_a_partition_assigned_while_the_producer_is_replaced_waits_for_the_rewind() -> None:
    # From the producer's failure to the end of the rewind, no message is processed, of
    # any partition, including one assigned meanwhile: its offset was read before the
    # old transaction was settled, and only the rewind places it on the committed one.
    transactions = FakeTransactions(failures=[ProducerFailedError("watchdog")])
    transactions.reset_gate = asyncio.Event()
    fetcher = GatedFetcher()
    pipeline, delivery, source, fatal = make_pipeline(transactions, fetcher)
    loop_task = asyncio.create_task(delivery.run_transactions())
    pipeline.on_messages([message(0, "http://o/a.jpg")])
    await asyncio.wait_for(transactions.reset_called.wait(), 5)
    pipeline.on_assigned([(TOPIC, 1)])
    pipeline.on_messages([message(7, "http://o/early.jpg", partition=1)])
    await settle()
    assert "http://o/early.jpg" not in fetcher.fetched
    source.after_seek = [message(0, "http://o/a.jpg"), message(5, "http://o/p1.jpg", partition=1)]
    transactions.reset_gate.set()
    await asyncio.wait_for(source.rewound.wait(), 5)
    assert await pipeline.wait_idle(5)
    delivery.stop_transactions()
    await loop_task
    assert sorted(transactions.committed_offsets()) == [0, 5]
    assert "http://o/early.jpg" not in fetcher.fetched
    assert not fatal
