"""Last step: publish suggestions and dead-letter records to Kafka.

At-least-once (`Publisher`). Takes: a topic, key, value bytes and headers. `publish`
returns once the broker has acknowledged the record (acks=all, idempotent producer), so
the caller may then store the input offset. Raises `PublishError` when the broker refuses
it for good (delivery timeout, unknown topic, not authorised); the caller keeps the input
offset unstored and retries. A thread of its own serves the producer's delivery reports
and resolves the asyncio futures on the event loop.

Exactly-once (`TransactionalPublisher`). Takes: records in the order they must appear,
the input offsets they answer and the consumer's group metadata. `commit` makes them one
Kafka transaction: the records and the offsets become visible together (to
read_committed readers and to the group) or not at all. Raises `PublishError` when the
transaction was aborted (the caller sends the same records again); `ProducerFailedError`
when the producer reached a fatal state on its own (the caller `reset()`s it and rewinds
to the committed offsets: whether the failed transaction committed is not known);
`PublishFatalError` when a newer process took over the transactional.id (this one must
stop). Every producer call runs on one thread of its own, in order.

Transaction errors are handled as librdkafka documents them. A retriable error
(`__TIMED_OUT` included: a commit goes on in the background) is answered by calling the
same function again, after a pause, with the same arguments; only an error that says
`txn_requires_abort()` aborts; a fatal one breaks the producer. A call that is still
retriable when the transaction's time is spent, or an error with no recipe, leaves the
outcome unknown: `ProducerFailedError` (abort is no answer then: while a commit is under
way librdkafka refuses it with `__CONFLICT`). A producer given up on (the watchdog, or
`reset()`) is inert: its thread makes no further call, so a call that returns late is
never followed by a commit.

A fence is not always another process. The transaction coordinator aborts a transaction
that outlives `transaction.timeout.ms` (a broker outage in the middle of its commit, say)
and bumps the producer's epoch; librdkafka then reports the producer's next call as
fenced. So `commit` takes the first `FENCES_TOLERATED` fences within `FENCE_WINDOW_S` for
a failed producer (`ProducerFailedError`: replaced, pipeline rewound) and only more of
them for a takeover: two live processes sharing a transactional.id fence each other
over and over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from category_suggester.errors import (
    ProducerFailedError,
    PublishError,
    PublishFatalError,
    RecordTooLargeError,
)
from category_suggester.retry import Backoff
from category_suggester.settings import Settings
from category_suggester.threads import NamedThread

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
            "message.max.bytes": settings.kafka.max_record_bytes,
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
        self._thread = NamedThread(target=self._serve, name="kafka-producer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Delivery reports gathered on the producer's thread, handed to the event loop in
        # one wake-up per poll rather than one per record.
        self._reports: list[tuple[asyncio.Future[None], KafkaError | None]] = []
        self._reports_lock = threading.Lock()

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
            with self._reports_lock:
                self._reports.append((future, err))

        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=list(headers), on_delivery=on_delivery
                )
                break
            except BufferError:
                # The local queue is full: wait for deliveries to make room.
                await asyncio.to_thread(self._poll, self.POLL_TIMEOUT_S)
            except KafkaException as exc:
                raise _publish_error(exc.args[0]) from exc
        await future

    async def flush(self, timeout_s: float) -> int:
        """Wait for outstanding deliveries; return how many are still not acknowledged."""
        remaining: int = await asyncio.to_thread(self._producer.flush, timeout_s)
        self._hand_over_reports()
        return remaining

    async def close(self, timeout_s: float = 10.0) -> None:
        remaining = await self.flush(timeout_s)
        if remaining:
            log.error("producer closed with unacknowledged records", extra={"count": remaining})
        self._closed.set()
        await asyncio.to_thread(self._thread.join)

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._poll(self.POLL_TIMEOUT_S)

    def _poll(self, timeout_s: float) -> None:
        self._producer.poll(timeout_s)
        self._hand_over_reports()

    def _hand_over_reports(self) -> None:
        with self._reports_lock:
            reports, self._reports = self._reports, []
        if reports and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                self._loop.call_soon_threadsafe(_settle_all, reports)


def _settle_all(reports: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, err in reports:
        if future.done():
            continue
        if err is None:
            future.set_result(None)
        else:
            future.set_exception(_publish_error(err))


def _publish_error(err: KafkaError) -> PublishError:
    """The error for a record the producer or the broker did not take."""
    if err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return RecordTooLargeError(f"record too large: {err.str()}")
    if err.fatal():
        return PublishFatalError(f"producer failed: {err.str()}")
    return PublishError(f"delivery failed: {err.str()}")


@dataclass(frozen=True)
class OutputRecord:
    """One record to publish: a suggestion or a dead-letter record."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers = ()


def transactional_id(settings: Settings) -> str:
    """The configured transactional.id, else one derived as settings.py describes."""
    kafka = settings.kafka
    if kafka.transactional_id:
        return kafka.transactional_id
    if kafka.group_instance_id:
        return f"{kafka.group_id}.{kafka.group_instance_id}"
    return f"{kafka.group_id}.{uuid.uuid4().hex}"


def transactional_config(settings: Settings) -> dict[str, Any]:
    conf = producer_config(settings)
    # librdkafka derives the delivery and socket timeouts from the transaction timeout; an
    # explicit delivery timeout longer than it is refused.
    conf.pop("delivery.timeout.ms", None)
    conf.update(
        {
            "transactional.id": transactional_id(settings),
            "transaction.timeout.ms": settings.kafka.transaction_timeout_ms,
        }
    )
    conf.update(settings.kafka.extra)
    return conf


class TransactionalPublisher:
    """A transactional producer: each `commit` is one transaction of records and offsets."""

    # Fences within the window taken for a coordinator's epoch bump (module docstring).
    FENCES_TOLERATED = 3
    FENCE_WINDOW_S = 600.0

    def __init__(
        self,
        settings: Settings,
        *,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        watchdog_s: float | None = None,
    ) -> None:
        self._conf = transactional_config(settings)
        self.transactional_id: str = self._conf["transactional.id"]
        self._timeout_s = settings.kafka.transaction_timeout_ms / 1000
        # A transaction retries its offsets and commit for up to the timeout, then its
        # abort for up to the timeout again. librdkafka does not always keep to its timeouts
        # (send_offsets_to_transaction can wait for ever on a group coordinator that went
        # away: librdkafka issues 5456, 5511); past this, the producer counts as broken.
        self._watchdog_s = watchdog_s or 2 * self._timeout_s + 5
        self._factory = producer_factory
        self._lane = _Lane(producer_factory(self._conf))
        # When recent fences happened (monotonic seconds), for the tolerance above.
        self._fences: list[float] = []

    async def start(self) -> None:
        """Register the transactional.id: fences an older producer with the same id and
        aborts its open transaction. Raises `PublishFatalError` when that fails."""
        try:
            await self._call(_init, self._lane.producer, self._timeout_s, self._lane.progress)
        except (KafkaException, ProducerFailedError) as exc:
            raise PublishFatalError(f"init_transactions failed: {exc}") from exc

    async def reset(self) -> None:
        """Replace the producer by a new one with the same transactional.id, whose
        registration ends the old one's transaction (aborted, or completed if its commit
        had reached the coordinator). The old producer is left to its thread, which may
        be stuck in a call; it is fenced and never used again. Raises
        `ProducerFailedError` to be tried again later, `PublishFatalError` when fenced."""
        self._lane.retire()
        self._lane = _Lane(self._factory(self._conf))
        try:
            await self._call(_init, self._lane.producer, self._timeout_s, self._lane.progress)
        except KafkaException as exc:
            raise _failure(exc.args[0], "registering a new producer failed") from exc

    async def commit(
        self,
        records: Sequence[OutputRecord],
        offsets: Mapping[tuple[str, int], int],
        group_metadata: object,
    ) -> None:
        """Publish `records` in this order and commit `offsets` (next offsets to read) for
        the group, atomically. See the module docstring for what it raises."""
        try:
            lane = self._lane
            await self._call(
                _transaction,
                lane.producer,
                records,
                offsets,
                group_metadata,
                self._timeout_s,
                lane.progress,
            )
        except PublishFatalError as exc:
            if not self._fence_tolerated():
                raise
            raise ProducerFailedError(
                f"{exc.message} (taken for the coordinator ending a timed-out transaction: "
                f"fence {len(self._fences)} of {self.FENCES_TOLERATED} tolerated in "
                f"{self.FENCE_WINDOW_S:.0f} s)"
            ) from exc

    def _fence_tolerated(self) -> bool:
        now = time.monotonic()
        self._fences = [t for t in self._fences if now - t < self.FENCE_WINDOW_S]
        self._fences.append(now)
        return len(self._fences) <= self.FENCES_TOLERATED

    async def close(self) -> None:
        """Close after the last commit: nothing is pending then."""
        try:
            await self._call(self._lane.producer.flush, 5.0)
        except ProducerFailedError as exc:
            log.warning("closing the producer", extra={"error": exc.message})
        self._lane.retire()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        lane = self._lane
        try:
            async with asyncio.timeout(self._watchdog_s):
                return await lane.call(fn, *args)
        except TimeoutError as exc:
            # Inert from now on, before anything else runs: the stuck call, should it
            # return, must not go on to end the transaction.
            lane.retire()
            raise ProducerFailedError(
                f"a transactional call did not return within {self._watchdog_s:.0f} s "
                f"({lane.progress.step})"
            ) from exc


class _Lane:
    """One producer and the one thread that makes its calls, in order.

    The transactional calls must not overlap and they block. The thread is a daemon: one
    stuck in librdkafka must not keep the process from exiting.
    """

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        # The call under way, and the give-up flag: once set, that call makes no further
        # transactional call (a late send_offsets is never followed by a commit).
        self.progress = _Progress()
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        NamedThread(target=self._serve, name="kafka-txn", daemon=True).start()

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put(_Call(fn, args, loop, future))
        return await future

    def retire(self) -> None:
        """Give the producer up: the call it may be in makes no further call, and the
        thread ends after it; the producer goes with it."""
        self.progress.cancelled.set()
        self._calls.put(None)

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                result = call.fn(*call.args)
            except Exception as exc:  # noqa: BLE001  (relayed to the caller, as an executor does)
                outcome: tuple[Any, Exception | None] = (None, exc)
            else:
                outcome = (result, None)
            # A call given up on (the watchdog) can return after its loop closed: nobody
            # waits for it any more.
            with contextlib.suppress(RuntimeError):
                call.loop.call_soon_threadsafe(_settle_call, call.future, *outcome)


@dataclass(frozen=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _settle_call(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # the caller gave up (the watchdog)
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


# -- transactional calls, made on a lane's thread -----------------------------------------

# Pause between two tries of a retriable transactional call, doubling up to the maximum,
# without jitter (one call of one producer). librdkafka answers a resumed call at once
# while its operation is still under way (`__TIMED_OUT` for a call whose time is up), so
# retrying without a pause spins a core.
RETRY_BACKOFF_S = 0.05
RETRY_BACKOFF_MAX_S = 1.0
_CALL_BACKOFF = Backoff(RETRY_BACKOFF_S, RETRY_BACKOFF_MAX_S, floor=1.0)


class _Progress:
    """Shared by a lane's thread and the event loop: the transactional call under way (the
    watchdog names it) and the flag that gives the producer up."""

    def __init__(self) -> None:
        self.step = "idle"
        self.cancelled = threading.Event()


class _GivenUpError(Exception):
    """The producer was given up while its call ran: no further call is made."""


def _init(producer: Producer, timeout_s: float, progress: _Progress) -> None:
    deadline = time.monotonic() + timeout_s
    _retrying(
        lambda: producer.init_transactions(_left(deadline)), deadline, progress, "init_transactions"
    )


def _transaction(
    producer: Producer,
    records: Sequence[OutputRecord],
    offsets: Mapping[tuple[str, int], int],
    group_metadata: object,
    timeout_s: float,
    progress: _Progress,
) -> None:
    """One transaction: the records, the offsets, the commit; an abort only where
    librdkafka asks for one (module docstring).

    A commit may outlast the transaction timeout (the coordinator no longer aborts a
    transaction once its commit has reached it): it is waited for, not abandoned.
    `commit_transaction(-1)` blocks until librdkafka has the coordinator's answer or an
    error; retries of retriable errors end at twice the transaction timeout, and the
    watchdog (`TransactionalPublisher`) bounds a call that blocks longer.
    """
    deadline = time.monotonic() + 2 * timeout_s
    try:
        _check(progress, "begin_transaction")
        producer.begin_transaction()
        progress.step = "produce"
        for record in records:
            _produce(producer, record)
        positions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        _retrying(
            lambda: producer.send_offsets_to_transaction(
                positions, group_metadata, _left(deadline)
            ),
            deadline,
            progress,
            "send_offsets_to_transaction",
        )
        # -1, as librdkafka recommends (other values risk its state going out of step
        # when a request fails): the call blocks until the coordinator has answered or an
        # error comes; a retriable error is retried.
        _retrying(lambda: producer.commit_transaction(-1), deadline, progress, "commit_transaction")
    except KafkaException as exc:
        error: KafkaError = exc.args[0]
        if error.fatal():
            raise _failure(error, "transactional producer failed") from exc
        if not error.txn_requires_abort():
            # Still retriable when the time was up, or an error without a recipe: whether
            # the transaction commits is not known here, and abort would be refused while
            # a commit is under way. A new producer's registration settles it.
            raise ProducerFailedError(f"transaction outcome unknown: {error.str()}") from exc
        try:
            _retrying(
                lambda: producer.abort_transaction(_left(deadline)),
                deadline,
                progress,
                "abort_transaction",
            )
        except KafkaException as abort_exc:
            # Not aborted: this producer cannot go on; a new one must settle its transaction.
            raise _failure(abort_exc.args[0], "aborting the transaction failed") from abort_exc
        raise PublishError(f"transaction aborted: {error.str()}") from exc


def _produce(producer: Producer, record: OutputRecord) -> None:
    while True:
        try:
            producer.produce(
                record.topic, value=record.value, key=record.key, headers=list(record.headers)
            )
            return
        except BufferError:
            # The local queue is full: serve deliveries to make room.
            producer.poll(0.1)


def _left(deadline: float) -> float:
    """Seconds to `deadline`, at least a little: a call with no time left fails at once."""
    return max(0.5, deadline - time.monotonic())


def _check(progress: _Progress, step: str) -> None:
    """About to make the call `step`: recorded for the watchdog, refused once given up."""
    progress.step = step
    if progress.cancelled.is_set():
        raise _GivenUpError("the producer was given up; no further call is made")


def _retrying(call: Callable[[], None], deadline: float, progress: _Progress, step: str) -> None:
    """Run `call`, again after a pause while librdkafka says the same call may succeed
    (the arguments are the same each time), until `deadline`. Raises `_GivenUpError`
    instead of making a call once the producer is given up."""
    retries = _CALL_BACKOFF.retries()
    while True:
        _check(progress, step)
        try:
            call()
            return
        except KafkaException as exc:
            error: KafkaError = exc.args[0]
            if not error.retriable() or time.monotonic() >= deadline:
                raise
            log.debug("transactional call retried", extra={"error": error.str()})
        # Woken early by a give-up: the next round raises instead of calling.
        progress.cancelled.wait(min(retries.next_delay_s(), max(0.0, deadline - time.monotonic())))


# A newer producer registered our transactional.id: two processes think they own it.
_FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED})


def _failure(error: KafkaError, what: str) -> PublishError:
    if error.code() in _FENCED:
        return PublishFatalError(f"{what}: {error.str()}")
    return ProducerFailedError(f"{what}: {error.str()}")
