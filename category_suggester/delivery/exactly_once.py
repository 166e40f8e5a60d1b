"""Exactly-once delivery: answers are published with their input offsets in Kafka
transactions (consume-transform-produce, KIP-447).

Answers wait in a per-partition buffer; every `consumer.transaction_interval_s` the
ready prefix of each partition (every earlier offset answered) is published in offset
order inside one transaction that also commits those offsets for the group, with the
consumer's group metadata (a zombie's transaction is refused). A read_committed reader
sees each answer once, in input order per partition. Buffered answers count as in
flight for back-pressure.

Recovery. An aborted transaction is sent again with the same records (they are still
in memory, so nothing is re-read). A producer that breaks (a broker crash can leave its
transaction unendable; a call that outlives the watchdog; a transaction whose outcome is
unknown) is replaced by a new one with the same transactional.id, which settles the old
transaction, and every partition rewinds to its committed offset: all work in memory is
dropped and read again. From the failure to the end of the rewind no message handed over
is processed, of any partition, including one assigned meanwhile (`taking`): the rewind
places every assigned partition on its committed offset, read once the old transaction
is settled. A fenced producer is replaced the same way (the coordinator fences a
transaction that outlived its timeout, as in a broker outage) unless fences repeat,
which means another live process shares the transactional.id: that stops the service
(publish.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from confluent_kafka import KafkaException

from category_suggester.consume import Partition, Source
from category_suggester.delivery import Host
from category_suggester.errors import (
    ProducerFailedError,
    PublishError,
    PublishFatalError,
    SuggesterError,
)
from category_suggester.metrics import Metrics
from category_suggester.publish import OutputRecord, TransactionalPublisher
from category_suggester.retry import Backoff, wait_or_stop
from category_suggester.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Answer:
    """An answer waiting for its transaction."""

    record: OutputRecord
    # Suggestions: for the end-to-end latency, observed once the transaction commits.
    uploaded_at: datetime | None
    ready_at: float


class ExactlyOnce:
    """Delivery through a `TransactionalPublisher`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        transactions: TransactionalPublisher,
        *,
        source: Source,
        stop: asyncio.Event,
        on_fatal: Callable[[SuggesterError], None],
    ) -> None:
        """`transactions` already started (its transactional.id registered); `source`
        gives the group metadata and rewinds; `stop` is set when the shutdown grace
        period is over; `on_fatal` stops the service."""
        self._settings = settings
        self._metrics = metrics
        self._transactions = transactions
        self._source = source
        self._stop = stop
        self._on_fatal = on_fatal
        self._host: Host | None = None
        # Answers by partition and offset until their transaction commits.
        self._answers: dict[Partition, dict[int, _Answer]] = defaultdict(dict)
        self._commit_lock = asyncio.Lock()
        self._commit_wanted = asyncio.Event()
        self._committing = True
        # Set from a producer failure to the end of the rewind: messages handed over then
        # were read before the seek and are read again after it.
        self._rewinding = False
        self._loop_task: asyncio.Task[None] | None = None
        self._publish_retries = metrics.retries.labels(stage="publish")
        self._backoff = Backoff(
            settings.kafka.retry_backoff_base_s, settings.kafka.retry_backoff_max_s
        )

    def bind(self, host: Host) -> None:
        self._host = host

    @property
    def taking(self) -> bool:
        return not self._rewinding

    async def deliver(
        self,
        tp: Partition,
        offset: int,
        epoch: int,
        record: OutputRecord,
        *,
        uploaded_at: datetime | None,
    ) -> None:
        # Kept only if the partition's work was not abandoned meanwhile: otherwise its
        # next reader answers it.
        assert self._host is not None
        if not self._host.is_current(tp, epoch):
            return
        answers = self._answers[tp]
        if offset in answers:
            self._host.release(1)  # a second answer for one offset replaces the first
        answers[offset] = _Answer(record, uploaded_at, time.perf_counter())

    def answered(self, tp: Partition, committable: int | None) -> bool:
        if committable is not None:
            self._commit_wanted.set()
        return True

    async def revoked(
        self, partitions: Sequence[Partition], give_up_at: float
    ) -> dict[Partition, int]:
        """Commit the moving partitions' finished work in a transaction, in this
        generation, before they move; the consumer commits nothing."""
        await self.commit_answers(partitions, give_up_at=give_up_at)
        return {}

    def dropped(self, tp: Partition) -> None:
        """Forget a partition's uncommitted answers: its next owner answers them again."""
        dropped = self._answers.pop(tp, {})
        if dropped and self._host is not None:
            self._host.release(len(dropped))

    def holding(self) -> set[Partition]:
        return set(self._answers)

    def final_offsets(self) -> dict[Partition, int]:
        return {}

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self.run_transactions())
        self._loop_task.add_done_callback(self._loop_done)

    async def finish(self) -> None:
        self.stop_transactions()
        if self._loop_task is not None:
            await self._loop_task
        # One last transaction for what finished while the grace period ran out.
        await self.commit_answers()

    async def close(self) -> None:
        await self._transactions.close()

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.error("the transaction loop failed", exc_info=error)
            self._on_fatal(PublishFatalError(f"the transaction loop failed: {error!r}"))

    # -- the transaction loop ------------------------------------------------------------

    async def run_transactions(self) -> None:
        """Commit ready answers as they come, at most once per transaction interval.

        Runs until `stop_transactions()`; a commit under way is finished, never cancelled
        (its outcome decides which answers are still pending).
        """
        loop = asyncio.get_running_loop()
        interval = self._settings.consumer.transaction_interval_s
        while self._committing:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            if not self._committing:
                break
            started = loop.time()
            await self.commit_answers()
            if self._rewinding:
                await self._rewind()
            # Whatever finishes meanwhile joins the next transaction.
            await wait_or_stop(self._stop, max(0.0, interval - (loop.time() - started)))

    def stop_transactions(self) -> None:
        self._committing = False
        self._commit_wanted.set()

    async def commit_answers(
        self, partitions: Sequence[Partition] | None = None, *, give_up_at: float | None = None
    ) -> bool:
        """Commit the ready answers (of `partitions`, default all) in one transaction.

        An aborted transaction is retried with backoff, re-collected each time (a partition
        lost meanwhile drops out), until it commits, the service stops or `give_up_at` (a
        loop time) passes. Returns whether nothing ready is left uncommitted.
        """
        assert self._host is not None
        loop = asyncio.get_running_loop()
        retries = self._backoff.retries()
        async with self._commit_lock:
            while True:
                records, offsets, taken = self._ready_answers(partitions)
                if not records:
                    return True
                metadata = self._source.group_metadata()
                if metadata is None:
                    return False
                try:
                    await self._transactions.commit([a.record for a in records], offsets, metadata)
                except ProducerFailedError as exc:
                    log.warning(
                        "transactional producer failed; replacing it and rewinding",
                        extra={"error": exc.message},
                    )
                    self._publish_retries.inc()
                    await self._replace_producer()
                    return False
                except PublishError as exc:
                    if not exc.retryable:
                        log.error("transactions stopped", extra={"error": exc.message})
                        self._on_fatal(exc)
                        return False
                    self._publish_retries.inc()
                    log.warning(
                        "transaction aborted; its answers go into the next one",
                        extra={"count": len(records), "error": exc.message},
                    )
                    out_of_time = give_up_at is not None and loop.time() >= give_up_at
                    if self._stop.is_set() or out_of_time:
                        return False
                    await retries.wait(self._stop)
                    continue
                self._committed(records, taken)
                return True

    # -- producer replacement and rewind ---------------------------------------------------

    async def _replace_producer(self) -> None:
        """Drop all work in memory and take a new producer; the rewind follows (outside
        the commit lock: the consumer thread may be waiting on it in a revoke)."""
        assert self._host is not None
        self._rewinding = True
        self._host.abandon_all()
        retries = self._backoff.retries()
        while not self._stop.is_set():
            try:
                await self._transactions.reset()
                break
            except ProducerFailedError as exc:
                log.warning("new producer not ready; retrying", extra={"error": exc.message})
            except PublishError as exc:
                log.error("transactions stopped", extra={"error": exc.message})
                self._on_fatal(exc)
                return
            await retries.wait(self._stop)
        self._commit_wanted.set()  # the transaction loop runs the rewind

    async def _rewind(self) -> None:
        """Seek every partition to its committed offset, then take messages again."""
        retries = self._backoff.retries()
        while not self._stop.is_set():
            try:
                await self._source.rewind(then=self._rewound)
            except KafkaException as exc:
                log.warning("rewind failed; retrying", extra={"error": str(exc)})
                await retries.wait(self._stop)
                continue
            return

    def _rewound(self) -> None:
        """The seek is done (on the loop, after the last hand-over of a message read before
        it and before the first of one read after it): drop any state the ignored messages
        may have left, and take what is read from the committed offsets."""
        assert self._host is not None
        self._host.abandon_all()
        self._rewinding = False

    # -- the answer buffer -----------------------------------------------------------------

    def _ready_answers(
        self, partitions: Sequence[Partition] | None
    ) -> tuple[list[_Answer], dict[Partition, int], dict[Partition, list[int]]]:
        """Per partition, the answers below its committable offset, in offset order."""
        assert self._host is not None
        records: list[_Answer] = []
        offsets: dict[Partition, int] = {}
        taken: dict[Partition, list[int]] = {}
        for tp, answers in self._answers.items():
            if partitions is not None and tp not in partitions:
                continue
            committable = self._host.committable(tp)
            if committable is None:
                continue
            ready = sorted(o for o in answers if o < committable)
            if ready:
                records += [answers[o] for o in ready]
                offsets[tp] = committable
                taken[tp] = ready
        return records, offsets, taken

    def _committed(self, records: list[_Answer], taken: dict[Partition, list[int]]) -> None:
        assert self._host is not None
        now = time.perf_counter()
        wall = time.time()
        publish_latency = self._metrics.stage_latency.labels(stage="publish")
        for answer in records:
            publish_latency.observe(now - answer.ready_at)
            if answer.uploaded_at is not None:
                latency = max(0.0, wall - answer.uploaded_at.timestamp())
                self._metrics.end_to_end_latency.observe(latency)
        finished = 0
        for tp, done in taken.items():
            # A partition lost during the commit has been dropped already.
            answers = self._answers.get(tp)
            if answers is None:
                continue
            for offset in done:
                if answers.pop(offset, None) is not None:
                    finished += 1
            if not answers:
                del self._answers[tp]
        if finished:
            self._host.release(finished)
