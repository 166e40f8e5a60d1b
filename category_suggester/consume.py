"""Step 1: consume `listing-image-uploaded` from Kafka.

Takes: KafkaSettings; at `start`, a `PartitionHandler` (the pipeline) that receives
messages and rebalance news on the event loop. Gives: batches of `confluent_kafka.Message`
to the handler; applies the requests of the pipeline and its delivery (`Source`: release
credit, store offsets, rewind) and keeps the group metadata for transactions.

In-flight credit: the thread counts the messages it hands over, the handler `release`s
them as they leave its window. At `consumer.max_inflight` outstanding the thread hands over
nothing more until the window is back down to `consumer.resume_inflight`. Counting in the
thread, not on the loop, bounds what is in flight even while the loop is too busy to read
what was handed over (with a backlog, librdkafka returns a full batch at every poll: a
pause requested from the loop came too late, and the window overshot by thousands under
sustained overload).

Out of credit, the thread first just waits (up to PAUSE_AFTER_S) for the pipeline to
release; only a pipeline that stays full that long gets its partitions paused. Pausing a
partition throws away what librdkafka has prefetched for it, and resuming starts a fetch
from the broker again: pausing at every mark under steady overload (the window fills in
well under a second) left the pipeline empty after each resume, waiting for the refetch,
and cost a quarter of the throughput of the overhead benchmark.

One thread owns the librdkafka consumer (it is not safe to call from two threads at once):
it polls, applies the requests queued by the event loop between polls, and runs the
rebalance callbacks. A revoke blocks that thread, not the event loop, while the loop
finishes (or abandons, after the grace period) the work of the partitions that move, so
their offsets can be committed before another member takes them over.

Offsets, at-least-once: `enable.auto.offset.store=false`; the app stores an offset only
when every earlier offset of its partition is answered (see offsets.py); librdkafka
commits stored offsets every `commit_interval_s`, and we commit synchronously on revoke
and on close.

Offsets, exactly-once: the consumer commits nothing itself (`enable.auto.commit=false`);
the app commits offsets inside its producer's transactions, with the group metadata this
thread keeps current in `group_metadata()` (the generation changes on every rebalance,
and a transaction carrying a stale one is refused by the broker, which fences zombies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from category_suggester.metrics import Metrics
from category_suggester.settings import DeliveryMode, Settings
from category_suggester.threads import NamedThread

log = logging.getLogger(__name__)

Partition = tuple[str, int]


class PartitionHandler(Protocol):
    """What the source calls on the event loop."""

    def on_messages(self, messages: Sequence[Message]) -> None: ...

    def on_assigned(self, partitions: Sequence[Partition]) -> None: ...

    async def on_revoked(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Finish or abandon work of these partitions; return offsets to commit."""
        ...

    def on_lost(self, partitions: Sequence[Partition]) -> None: ...


class Source(Protocol):
    """What the pipeline and its delivery ask of the source, on the event loop."""

    def release(self, count: int) -> None:
        """`count` handed-over messages left the in-flight window."""
        ...

    def store(self, offsets: dict[Partition, int]) -> None:
        """Store these next-offsets-to-read for the consumer to commit (at-least-once)."""
        ...

    def group_metadata(self) -> object | None:
        """The consumer's group metadata, for a transaction's offsets (exactly-once)."""
        ...

    async def rewind(self, then: Callable[[], None]) -> None:
        """Seek every assigned partition back to its committed offset (exactly-once)."""
        ...


@dataclass(frozen=True)
class _Request:
    kind: str  # "drain" | "store" | "rewind" | "assigned"
    partitions: tuple[Partition, ...] = ()
    offsets: tuple[tuple[str, int, int], ...] = ()
    # "rewind": settled on the event loop once done (an exception if it failed), after
    # `then` ran there (only when it succeeded).
    reply: asyncio.Future[None] | None = None
    then: Callable[[], None] | None = None


def refusal(error: KafkaError) -> str | None:
    """Why the brokers refuse this client for good, or None for a passing fault.

    librdkafka retries everything for ever and reports it only to error_cb; these are the
    errors that no retry with the same settings can mend.
    """
    text = error.str()
    if error.fatal():
        return f"fatal Kafka client error: {text}"
    if error.code() == KafkaError._AUTHENTICATION:
        return f"Kafka authentication failed: {text}"
    if error.code() == KafkaError._SSL or (
        error.code() == KafkaError._TRANSPORT and "certificate" in text.lower()
    ):
        return f"Kafka TLS handshake failed (certificate): {text}"
    return None


def consumer_config(
    settings: Settings,
    stats_cb: Callable[[str], None] | None,
    error_cb: Callable[[KafkaError], None] | None = None,
) -> dict[str, Any]:
    kafka = settings.kafka
    conf = kafka.common_config()
    conf.update(
        {
            "group.id": kafka.group_id,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": int(settings.consumer.commit_interval_s * 1000),
            "auto.offset.reset": "earliest",
            "session.timeout.ms": kafka.session_timeout_ms,
            "max.poll.interval.ms": kafka.max_poll_interval_ms,
            "isolation.level": "read_committed",
            "statistics.interval.ms": kafka.statistics_interval_ms,
        }
    )
    if settings.delivery is DeliveryMode.EXACTLY_ONCE:
        # Offsets are committed only inside the producer's transactions.
        conf["enable.auto.commit"] = False
    if kafka.group_instance_id:
        conf["group.instance.id"] = kafka.group_instance_id
    if stats_cb is not None and kafka.statistics_interval_ms > 0:
        conf["stats_cb"] = stats_cb
    if error_cb is not None:
        conf["error_cb"] = error_cb
    conf.update(kafka.extra)
    return conf


class KafkaSource:
    """The input topic, polled on a thread of its own; a `Source` for the pipeline.

    Built first (the librdkafka consumer is created, not subscribed), started with the
    handler it feeds, closed once: `close` also releases a consumer never started.
    """

    POLL_TIMEOUT_S = 0.1
    # Out of credit this long: pause the partitions (module docstring).
    PAUSE_AFTER_S = 0.5

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        # Given to start(): the consumer calls back into it only once started.
        self._handler: PartitionHandler
        self._on_refused = on_refused
        self._consumer = consumer_factory(consumer_config(settings, self._on_stats, self._on_error))
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._draining = False
        self._lag_labels: set[Partition] = set()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._assigned: set[Partition] = set()
        self._paused: set[Partition] = set()
        # In-flight credit (module docstring): messages handed over, and released back.
        # Each is written by one thread only (handed: the consumer's; released: the loop's).
        self._handed = 0
        self._released = 0
        self._credit_paused = False
        # Out of credit since (monotonic seconds), not yet paused; None when not starved.
        self._starved_since: float | None = None
        # Wakes the thread waiting for credit: the window fell to the resume mark, a
        # request was queued, or close.
        self._wake = threading.Event()
        self._waiting = False
        self._transactional = settings.delivery is DeliveryMode.EXACTLY_ONCE
        self._group_metadata: object | None = None
        self.fatal_error: KafkaException | None = None

    # -- called on the event loop -------------------------------------------------------

    def start(self, handler: PartitionHandler) -> None:
        """Subscribe and start polling; messages and rebalances go to `handler`."""
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._consumer.subscribe(
            [self._settings.kafka.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._thread = NamedThread(target=self._run, name="kafka-consumer", daemon=True)
        self._thread.start()

    def release(self, count: int) -> None:
        """`count` handed-over messages left the in-flight window (answered, abandoned,
        or ignored). Called on the event loop; read by the consumer thread."""
        self._released += count
        if self._waiting and self._outstanding() <= self._settings.consumer.resume_inflight:
            self._wake.set()

    def store(self, offsets: dict[Partition, int]) -> None:
        """Store these next-offsets-to-read; librdkafka commits them on its interval."""
        if offsets:
            items = tuple((t, p, o) for (t, p), o in offsets.items())
            self._submit(_Request("store", offsets=items))

    async def rewind(self, then: Callable[[], None]) -> None:
        """Seek every assigned partition back to its committed offset (exactly-once, after
        a producer failure), then run `then` on the event loop: after every message read
        before the seek has been handed over, before any read after it is. The caller
        switches from ignoring messages to taking them there: not after this returns,
        since the consumer thread may hand over messages read after the seek before the
        awaiting coroutine resumes (they would be ignored, and lost: the position is past
        them). Raises `KafkaException` when the committed offsets cannot be read, the
        committed offset of any one partition included (nothing was sought, `then` has
        not run)."""
        assert self._loop is not None
        reply: asyncio.Future[None] = self._loop.create_future()
        self._submit(_Request("rewind", reply=reply, then=then))
        await reply

    def stop_polling(self) -> None:
        """Stop fetching new messages (pause everything, for good: drain); rebalances are
        still served."""
        self._submit(_Request("drain"))

    async def close(self, final_offsets: dict[Partition, int]) -> None:
        """Commit `final_offsets` and leave the group. Returns once the thread is done.
        Never started: just closes the consumer."""
        self.store(final_offsets)
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            # Join off the loop: the thread may still call back into it during close.
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        else:
            await asyncio.to_thread(self._consumer.close)

    def _submit(self, request: _Request) -> None:
        self._requests.put(request)
        self._wake.set()

    def group_metadata(self) -> object | None:
        """The consumer's group metadata as of the last poll or rebalance (exactly-once:
        what a transaction sends with its offsets); None before the first poll."""
        return self._group_metadata

    @property
    def assigned(self) -> frozenset[Partition]:
        return frozenset(self._assigned)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the consumer thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._closed.is_set():
                self._apply_requests()
                # While draining every partition is paused, but polling goes on: it serves
                # rebalance callbacks, and anything already fetched is still handed over
                # (dropping a message would let a later offset be committed past it).
                limit = self._credit()
                if limit == 0:  # woken by a request before credit came back
                    continue
                messages = self._poll(limit)
                self._metrics.last_poll.set_to_current_time()
                self._refresh_group_metadata()
                good = [m for m in messages if not self._is_error(m)]
                if good:
                    self._handed += len(good)
                    self._call_soon(self._handler.on_messages, good)
            self._apply_requests()
            if not self._transactional:
                self._commit_sync()
        except KafkaException as exc:
            self.fatal_error = exc
            log.error("kafka consumer failed", extra={"error": str(exc)})
        finally:
            self._consumer.close()
            self._call_soon(lambda: None)

    def _credit(self) -> int:
        """How many messages may be handed over now; waits, pauses and resumes on the marks.

        Out of credit, it waits for the pipeline to release down to the resume mark, and
        pauses every partition once that took PAUSE_AFTER_S. 0: a request came first (it
        is applied before waiting on). Otherwise at least 1: a paused partition can still
        yield a message fetched before the pause, which must be handed over (dropping it
        would let a later offset be committed past it), so the window can overshoot by a
        message or two, never by a fetch queue.
        """
        marks = self._settings.consumer
        if self._credit_paused:
            if self._outstanding() <= marks.resume_inflight:
                self._credit_paused = False
                if not self._draining:
                    self._resume(set(self._paused))
        elif (
            not self._draining
            and (self._starved_since is not None or self._outstanding() >= marks.max_inflight)
            and not self._wait_for_credit()
        ):
            return 0
        return max(1, marks.max_inflight - self._outstanding())

    def _wait_for_credit(self) -> bool:
        """Wait until the window is down to the resume mark: True. Once starved for
        PAUSE_AFTER_S, pause every partition: True too (polling goes on, to serve the
        group). False when a request or close came first."""
        now = time.monotonic()
        if self._starved_since is None:
            self._starved_since = now
        self._wake.clear()
        self._waiting = True
        try:
            resume_mark = self._settings.consumer.resume_inflight
            if (
                self._outstanding() > resume_mark
                and self._requests.empty()
                and not self._closed.is_set()
            ):
                self._wake.wait(self._starved_since + self.PAUSE_AFTER_S - now)
            if self._outstanding() <= resume_mark:
                self._starved_since = None
                return True
            if time.monotonic() - self._starved_since >= self.PAUSE_AFTER_S:
                self._starved_since = None
                self._credit_paused = True
                self._pause(self._assigned - self._paused)
                return True
            return False
        finally:
            self._waiting = False

    def _outstanding(self) -> int:
        return self._handed - self._released

    def _poll(self, limit: int) -> list[Message]:
        """Wait up to POLL_TIMEOUT_S for a message, then take what else is already there,
        up to `limit` messages.

        librdkafka's batch consume waits until it has the whole batch or the timeout ran
        out: asking for poll_batch messages at once held every event of a stream slower
        than poll_batch per POLL_TIMEOUT_S for up to 100 ms (50 ms on average).
        """
        messages = self._consumer.consume(num_messages=1, timeout=self.POLL_TIMEOUT_S)
        more = min(limit, self._settings.consumer.poll_batch) - len(messages)
        if messages and more > 0:
            messages += self._consumer.consume(num_messages=more, timeout=0)
        return messages

    def _is_error(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        if error.fatal():
            raise KafkaException(error)
        log.warning("kafka consumer error", extra={"error": error.str()})
        return True

    def _apply_requests(self) -> None:
        to_store: dict[Partition, int] = {}
        while True:
            try:
                request = self._requests.get_nowait()
            except queue.Empty:
                break
            if request.kind == "drain":
                self._draining = True
                self._pause(self._assigned - self._paused)
            elif request.kind == "store":
                for topic, partition, offset in request.offsets:
                    if (topic, partition) in self._assigned:
                        to_store[(topic, partition)] = offset
            elif request.kind == "rewind" and request.reply is not None:
                self._rewind(request.reply, request.then)
            elif request.kind == "assigned":
                assigned = {tp for tp in request.partitions if tp in self._assigned}
                if self._draining or self._credit_paused:
                    self._pause(assigned - self._paused)
                elif assigned:
                    # librdkafka keeps a partition's paused flag across assignments: one
                    # paused here before it was revoked or lost would come back paused,
                    # and stay so.
                    self._consumer.resume([TopicPartition(t, p) for t, p in assigned])
        if to_store:
            self._consumer.store_offsets(
                offsets=[TopicPartition(t, p, o) for (t, p), o in to_store.items()]
            )

    def _rewind(self, reply: asyncio.Future[None], then: Callable[[], None] | None) -> None:
        error: KafkaException | None = None
        try:
            assigned = [TopicPartition(t, p) for t, p in sorted(self._assigned)]
            # With read_committed, a commit still inside an open transaction makes the
            # broker answer "unstable"; librdkafka retries until it is settled.
            committed = self._consumer.committed(assigned, timeout=30) if assigned else []
            # A partition whose committed offset came back with an error fails the whole
            # rewind (retried by the caller) before anything is sought: read as "none
            # committed", it would replay the partition from its beginning.
            for tp in committed:
                if tp.error is not None:
                    raise KafkaException(tp.error)
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                self._consumer.seek(TopicPartition(tp.topic, tp.partition, offset))
            log.info("rewound to the committed offsets", extra={"partitions": len(committed)})
        except KafkaException as exc:
            error = exc
        # Queued before any hand-over of a message read after the seek: the loop runs its
        # callbacks in order.
        self._call_soon(_settle, reply, error, then)

    def _pause(self, partitions: set[Partition]) -> None:
        if partitions:
            self._consumer.pause([TopicPartition(t, p) for t, p in partitions])
            self._paused |= partitions
            self._metrics.paused_partitions.set(len(self._paused))

    def _resume(self, partitions: set[Partition]) -> None:
        if partitions:
            self._consumer.resume([TopicPartition(t, p) for t, p in partitions])
            self._paused -= partitions
            self._metrics.paused_partitions.set(len(self._paused))

    def _refresh_group_metadata(self) -> None:
        if self._transactional:
            self._group_metadata = self._consumer.consumer_group_metadata()

    def _commit_sync(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed", extra={"error": str(exc)})

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
            self._loop.call_soon_threadsafe(fn, *args)

    # -- rebalance callbacks (on the consumer thread, inside consume()) ------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._refresh_group_metadata()
        assigned = [(tp.topic, tp.partition) for tp in partitions]
        self._assigned.update(assigned)
        self._metrics.assigned_partitions.set(len(self._assigned))
        # Paused or resumed once librdkafka has assigned them (after this callback).
        self._requests.put(_Request("assigned", partitions=tuple(assigned)))
        log.info("partitions assigned", extra={"partitions": _fmt(assigned)})
        self._call_soon(self._handler.on_assigned, assigned)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = [(tp.topic, tp.partition) for tp in partitions]
        assert self._loop is not None
        # The handler may commit a transaction for these partitions now, in this generation.
        self._refresh_group_metadata()
        offsets: dict[Partition, int] = {}
        if not self._loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._handler.on_revoked(revoked), self._loop)
            offsets = future.result()
        self._apply_requests()
        if offsets:
            commit = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
            try:
                consumer.commit(offsets=commit, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed", extra={"error": str(exc)})
        self._forget(revoked)
        log.info("partitions revoked", extra={"partitions": _fmt(revoked)})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = [(tp.topic, tp.partition) for tp in partitions]
        self._forget(lost)
        log.warning(
            "partitions lost; their in-flight work is dropped", extra={"partitions": _fmt(lost)}
        )
        self._call_soon(self._handler.on_lost, lost)

    def _forget(self, partitions: list[Partition]) -> None:
        self._assigned.difference_update(partitions)
        self._paused.difference_update(partitions)
        self._metrics.assigned_partitions.set(len(self._assigned))
        self._metrics.paused_partitions.set(len(self._paused))
        for topic, partition in partitions:
            if (topic, partition) in self._lag_labels:
                self._lag_labels.discard((topic, partition))
                self._metrics.consumer_lag.remove(topic, str(partition))

    # -- errors and statistics ------------------------------------------------------------

    def _on_error(self, error: KafkaError) -> None:
        """librdkafka's error reports (on the consumer thread): stop on a refusal."""
        why = refusal(error)
        if why is None:
            log.warning("kafka client error", extra={"error": error.str()})
            return
        log.error(why)
        if self._on_refused is not None:
            self._call_soon(self._on_refused, why)

    def _on_stats(self, raw: str) -> None:
        """librdkafka statistics: consumer lag per assigned partition."""
        stats = json.loads(raw)
        for topic, tstats in stats.get("topics", {}).items():
            for pid, pstats in tstats.get("partitions", {}).items():
                partition = int(pid)
                if partition < 0 or (topic, partition) not in self._assigned:
                    continue
                lag = pstats.get("consumer_lag", -1)
                if lag is not None and lag >= 0:
                    self._lag_labels.add((topic, partition))
                    self._metrics.consumer_lag.labels(topic=topic, partition=pid).set(lag)


def _settle(
    future: asyncio.Future[None],
    error: BaseException | None,
    then: Callable[[], None] | None = None,
) -> None:
    if future.done():
        return
    if error is None:
        if then is not None:
            then()
        future.set_result(None)
    else:
        future.set_exception(error)


def _fmt(partitions: Sequence[Partition]) -> str:
    return ",".join(f"{t}[{p}]" for t, p in sorted(partitions))
