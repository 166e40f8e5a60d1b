"""The transactional publisher against a fake producer: calls, errors, the watchdog."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from category_suggester.errors import ProducerFailedError, PublishError, PublishFatalError
from category_suggester.publish import RETRY_BACKOFF_S, OutputRecord, TransactionalPublisher
from category_suggester.settings import Settings

SETTINGS = Settings(
    delivery="exactly_once",
    kafka={"group_id": "g", "group_instance_id": "pod-0", "transaction_timeout_ms": 1000},
)


class FakeProducer:
    """Records the calls; `fail` maps a method to the KafkaError it raises once, or to a
    function that returns the error for this call (None: succeed)."""

    def __init__(self, conf: dict[str, Any], calls: list[str]) -> None:
        self.conf = conf
        self.calls = calls
        self.fail: dict[str, KafkaError | Callable[[], KafkaError | None]] = {}
        self.block: threading.Event | None = None
        # (name, monotonic time) of every call, and the arguments of each send_offsets.
        self.times: list[tuple[str, float]] = []
        self.offsets_args: list[tuple[list[Any], object]] = []
        self.thread: threading.Thread | None = None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        self.times.append((name, time.monotonic()))
        self.thread = threading.current_thread()
        failure = self.fail.get(name)
        if callable(failure):
            error = failure()
            if error is not None:
                raise KafkaException(error)
        elif failure is not None:
            raise KafkaException(self.fail.pop(name))

    def init_transactions(self, timeout: float) -> None:
        self._call("init")

    def begin_transaction(self) -> None:
        self._call("begin")

    def produce(self, topic: str, value: bytes, key: bytes | None, headers: list[Any]) -> None:
        self.calls.append(f"produce {topic} {value.decode()}")

    def send_offsets_to_transaction(self, positions: list[Any], metadata: object, timeout: float):  # type: ignore[no-untyped-def]
        self.calls.append("offsets " + ",".join(f"{p.partition}:{p.offset}" for p in positions))
        self.offsets_args.append((positions, metadata))
        if self.block is not None:
            self.block.wait()
        self._call("send_offsets")

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort")

    def flush(self, timeout: float) -> int:
        return 0


class Factory:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.producers: list[FakeProducer] = []

    def __call__(self, conf: dict[str, Any]) -> FakeProducer:
        producer = FakeProducer(conf, self.calls)
        self.producers.append(producer)
        return producer


RECORDS = [OutputRecord("out", b"k", b"a"), OutputRecord("dlq", b"k", b"b", (("h", b"v"),))]
OFFSETS = {("in", 0): 7, ("in", 3): 2}


async def started(factory: Factory, **kwargs: Any) -> TransactionalPublisher:
    publisher = TransactionalPublisher(SETTINGS, producer_factory=factory, **kwargs)  # type: ignore[arg-type]
    await publisher.start()
    return publisher


async def test_a_commit_is_one_transaction_of_the_records_in_order_and_the_offsets() -> None:
    factory = Factory()
    publisher = await started(factory)
    await publisher.commit(RECORDS, OFFSETS, object())
    assert factory.calls == [
        "init",
        "begin",
        "produce out a",
        "produce dlq b",
        "offsets 0:7,3:2",
        "send_offsets",
        "commit",
    ]
    conf = factory.producers[0].conf
    assert conf["transactional.id"] == "g.pod-0"
    assert conf["transaction.timeout.ms"] == 1000
    assert "delivery.timeout.ms" not in conf
    await publisher.close()


async def test_retriable_calls_are_repeated_and_abortable_ones_abort() -> None:
    factory = Factory()
    publisher = await started(factory)
    producer = factory.producers[0]
    producer.fail["commit"] = KafkaError(KafkaError._TIMED_OUT, "slow", retriable=True)
    await publisher.commit(RECORDS, OFFSETS, object())
    assert factory.calls.count("commit") == 2

    producer.fail["send_offsets"] = KafkaError(
        KafkaError.ILLEGAL_GENERATION, "rebalanced", txn_requires_abort=True
    )
    with pytest.raises(PublishError) as raised:
        await publisher.commit(RECORDS, OFFSETS, object())
    assert type(raised.value) is PublishError
    assert raised.value.retryable
    assert factory.calls[-1] == "abort"


async def test_a_fatal_error_other_than_a_fence_is_a_broken_producer() -> None:
    factory = Factory()
    publisher = await started(factory)
    factory.producers[0].fail["commit"] = KafkaError(
        KafkaError.INVALID_TXN_STATE, "fatal", fatal=True
    )
    with pytest.raises(ProducerFailedError):
        await publisher.commit(RECORDS, OFFSETS, object())


def fence(producer: FakeProducer) -> None:
    producer.fail["send_offsets"] = KafkaError(
        KafkaError._FENCED, "Producer attempted an operation with an old epoch", fatal=True
    )


async def test_fences_count_as_a_broken_producer_until_they_repeat_within_the_window() -> None:
    # The coordinator bumps the epoch of a transaction that outlived its timeout (a broker
    # outage): a fence now and then is replaced; fence after fence is another process.
    factory = Factory()
    publisher = await started(factory)
    for _ in range(TransactionalPublisher.FENCES_TOLERATED):
        fence(factory.producers[-1])
        with pytest.raises(ProducerFailedError, match="old epoch"):
            await publisher.commit(RECORDS, OFFSETS, object())
        await publisher.reset()
        await publisher.commit(RECORDS, OFFSETS, object())
        assert factory.calls[-1] == "commit", "the new producer commits"

    fence(factory.producers[-1])
    with pytest.raises(PublishFatalError, match="old epoch"):
        await publisher.commit(RECORDS, OFFSETS, object())


async def test_fences_older_than_the_window_are_forgotten() -> None:
    factory = Factory()
    publisher = await started(factory)
    publisher.FENCE_WINDOW_S = 0.0  # every earlier fence is out of the window
    for _ in range(TransactionalPublisher.FENCES_TOLERATED + 2):
        fence(factory.producers[-1])
        with pytest.raises(ProducerFailedError):
            await publisher.commit(RECORDS, OFFSETS, object())
        await publisher.reset()


async def test_a_call_that_never_returns_breaks_the_producer_and_reset_replaces_it() -> None:
    factory = Factory()
    publisher = await started(factory, watchdog_s=0.2)
    stuck = threading.Event()
    factory.producers[0].block = stuck
    with pytest.raises(ProducerFailedError, match="did not return"):
        await publisher.commit(RECORDS, OFFSETS, object())

    await publisher.reset()
    assert len(factory.producers) == 2
    assert factory.calls[-1] == "init", "the new producer registers the transactional.id"
    await publisher.commit(RECORDS, OFFSETS, object())
    assert factory.calls[-1] == "commit"
    stuck.set()  # the old producer's thread ends; nothing it does reaches the new one
    await publisher.close()


def retriable(code: int, times: int) -> Callable[[], KafkaError | None]:
    """Fails `times` times with a retriable `code`, then succeeds."""
    left = [times]

    def fail() -> KafkaError | None:
        if left[0] == 0:
            return None
        left[0] -= 1
        return KafkaError(code, "not yet", retriable=True)

    return fail


async def test_a_commit_slower_than_the_transaction_timeout_is_waited_for_not_aborted() -> None:
    # librdkafka: a commit that times out goes on in the background and is resumed by
    # calling commit_transaction again; only txn_requires_abort() calls for an abort. The
    # transaction timeout here is 1 s: the commit answers after 1.3 s.
    factory = Factory()
    publisher = await started(factory)
    slow_until = time.monotonic() + 1.3

    def commit_in_progress() -> KafkaError | None:
        if time.monotonic() < slow_until:
            return KafkaError(KafkaError._TIMED_OUT, "still committing", retriable=True)
        return None

    factory.producers[0].fail["commit"] = commit_in_progress
    await publisher.commit(RECORDS, OFFSETS, object())
    assert "abort" not in factory.calls
    assert factory.calls[-1] == "commit"
    assert len(factory.producers) == 1


async def test_retries_of_offsets_and_commit_pause_and_repeat_the_same_arguments() -> None:
    factory = Factory()
    publisher = await started(factory)
    producer = factory.producers[0]
    producer.fail["send_offsets"] = retriable(KafkaError.COORDINATOR_LOAD_IN_PROGRESS, 2)
    producer.fail["commit"] = retriable(KafkaError._TIMED_OUT, 2)
    metadata = object()
    await publisher.commit(RECORDS, OFFSETS, metadata)
    assert [n for n, _ in producer.times].count("send_offsets") == 3
    assert [n for n, _ in producer.times].count("commit") == 3
    (first, first_metadata), *others = producer.offsets_args
    for positions, again in others:
        assert again is first_metadata is metadata
        assert [(p.topic, p.partition, p.offset) for p in positions] == [
            (p.topic, p.partition, p.offset) for p in first
        ]
    for name in ("send_offsets", "commit"):
        times = [t for n, t in producer.times if n == name]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert min(gaps) >= RETRY_BACKOFF_S * 0.9, f"{name} retried without a pause: {gaps}"
    assert "abort" not in factory.calls


async def test_only_an_abortable_error_aborts_an_unknown_outcome_breaks_the_producer() -> None:
    factory = Factory()
    publisher = await started(factory)
    # A commit that gives an error with no recipe (neither retriable, abortable nor
    # fatal): the commit may have reached the coordinator, so abort is no answer.
    factory.producers[0].fail["commit"] = KafkaError(KafkaError._STATE, "odd state")
    with pytest.raises(ProducerFailedError, match="outcome unknown"):
        await publisher.commit(RECORDS, OFFSETS, object())
    assert "abort" not in factory.calls


async def test_a_producer_given_up_by_the_watchdog_never_commits_after_a_late_call() -> None:
    # The watchdog gives up on a send_offsets that does not return; when it does return,
    # the old producer must not go on to commit_transaction (EndTxn): it is inert.
    factory = Factory()
    publisher = await started(factory, watchdog_s=0.2)
    stuck = threading.Event()
    old = factory.producers[0]
    old.block = stuck
    with pytest.raises(ProducerFailedError, match=r"did not return .*send_offsets_to_transaction"):
        await publisher.commit(RECORDS, OFFSETS, object())
    calls_when_given_up = len(factory.calls)
    stuck.set()
    assert old.thread is not None
    await asyncio.to_thread(old.thread.join, 5)
    assert not old.thread.is_alive()
    late = factory.calls[calls_when_given_up:]
    assert late == ["send_offsets"], f"the given-up producer went on: {late}"
    await publisher.reset()
    await publisher.commit(RECORDS, OFFSETS, object())
    assert factory.calls[-1] == "commit"
    await publisher.close()
