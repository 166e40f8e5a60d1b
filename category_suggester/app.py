"""The per-event pipeline: each consumed message through the steps to one answer.

    consume -> decode event -> fetch -> preprocess -> batch -> infer -> postprocess -> publish
                    └──────────── bad input ───────────────────────────────────────> DLQ

Every consumed message becomes one task that ends in exactly one of: a suggestion
acknowledged by Kafka, a DLQ record acknowledged by Kafka (bad input), or nothing (an
infrastructure fault outlasted shutdown; the offset stays uncommitted and the event is
consumed again). Offsets are stored only for the first two, and only when every earlier
offset of the partition is done (offsets.py).

Delivery (settings.delivery) sits behind one seam, category_suggester/delivery: the pipeline hands
each answer to a `Delivery` and tells it when an offset is answered; at-least-once
publishes at once and stores offsets for the consumer to commit, exactly-once keeps
answers for transactions that also commit the offsets (its module says how it
recovers). The pipeline knows nothing of transactions.

Back-pressure: the source hands over at most `consumer.max_inflight` messages that have
not left the window (`release` lets them go; exactly-once answers stay in it until their
transaction commits); at that mark it waits for the window to fall
to `consumer.resume_inflight`, and pauses every partition only when that takes longer
than half a second, a stall such as Triton down (polling goes on, so the group does not
evict us); see consume.py. Each step bounds its own concurrency as well.

The steps themselves are built, started and closed by service.py, which hands them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from confluent_kafka import Message

from category_suggester import __version__
from category_suggester.batch import Batcher
from category_suggester.consume import Partition, Source
from category_suggester.delivery import Delivery
from category_suggester.errors import (
    BadInputError,
    InfrastructureError,
    RecordTooLargeError,
    SuggesterError,
)
from category_suggester.events.codec import EventCodec
from category_suggester.events.dlq import DlqInfo, dead_letter_record, without_value
from category_suggester.fetch import ImageFetcher
from category_suggester.infer import ModelInfo
from category_suggester.metrics import Metrics
from category_suggester.offsets import OffsetTracker
from category_suggester.postprocess import postprocess, suggestion_record
from category_suggester.preprocess import Decoder
from category_suggester.publish import OutputRecord
from category_suggester.retry import Backoff
from category_suggester.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Stopwatch:
    fetch_s: float = 0.0
    decode_s: float = 0.0
    queue_s: float = 0.0
    infer_s: float = 0.0
    attempts: int = 1


class Pipeline:
    """Turns consumed messages into suggestions or DLQ records; tracks their offsets."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        *,
        codec: EventCodec,
        fetcher: ImageFetcher,
        decoder: Decoder,
        batcher: Batcher,
        delivery: Delivery,
        source: Source,
        model: ModelInfo,
        stop: asyncio.Event,
        on_fatal: Callable[[SuggesterError], None],
    ) -> None:
        """`delivery`: the mode's (category_suggester/delivery); bound to this pipeline here.
        `source`: what hands the messages over, told as they leave the in-flight window."""
        self._settings = settings
        self._on_fatal = on_fatal
        self._metrics = metrics
        self._codec = codec
        self._fetcher = fetcher
        self._decoder = decoder
        self._batcher = batcher
        self._delivery = delivery
        self._source = source
        # Cleared at shutdown: messages handed over after it are not processed.
        self._intake = True
        self._model = model
        # Set when the shutdown grace period is over: retries of outages give up then.
        self._stop = stop
        self._fetch_slots = asyncio.Semaphore(settings.fetch.concurrency)
        self._image_slots = asyncio.Semaphore(settings.decode.queue_size)
        self._threshold = confidence_threshold(settings, model)
        # An event whose dependency is down is tried again with this backoff.
        self._backoff = Backoff(
            settings.triton.retry_backoff_base_s, settings.triton.retry_backoff_max_s
        )
        # Metric children bound once: labels() costs a locked dict lookup per call.
        self._fetch_latency = metrics.stage_latency.labels(stage="fetch")
        self._decode_latency = metrics.stage_latency.labels(stage="decode")
        self._fetch_retries = metrics.retries.labels(stage="fetch")
        self._suggested = metrics.events.labels(outcome="suggested")
        self._confident = metrics.suggestions.labels(confident="true")
        self._not_confident = metrics.suggestions.labels(confident="false")
        self._tracker = OffsetTracker()
        self._tasks: dict[Partition, set[asyncio.Task[bool]]] = defaultdict(set)
        # Bumped whenever a partition's work is abandoned (revoked, lost, assigned anew,
        # rewound): a task from an older epoch finishes without touching offsets or answers.
        self._epochs: dict[Partition, int] = defaultdict(int)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        delivery.bind(self)

    # -- PartitionHandler ----------------------------------------------------------------

    def on_messages(self, messages: Sequence[Message]) -> None:
        if not self._intake or not self._delivery.taking:
            # Shutting down: a poll that raced the pause can still hand messages over.
            # Left untracked, they hold back nothing already tracked (they are later in
            # their partitions), no offset at or past them is committed here, and the
            # partition's next owner reads them; processing them instead could publish
            # answers after the final offsets were taken, duplicating them. Not taking
            # (exactly-once, rewinding): they are read again after the seek.
            self._source.release(len(messages))
            return
        for message in messages:
            tp = (message.topic() or "", message.partition() or 0)
            offset = message.offset() or 0
            self._tracker.track(tp, offset)
            epoch = self._epochs[tp]
            task = asyncio.create_task(self._process(tp, offset, message, epoch))
            task.add_done_callback(functools.partial(self._settle, tp, offset, epoch))
            self._tasks[tp].add(task)
        self._inflight += len(messages)
        self._metrics.inflight.set(self._inflight)
        self._idle.clear()

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        for tp in partitions:
            # Anything left of an earlier ownership is stale: its new reads start over.
            self._abandon(tp)

    async def on_revoked(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Give the moving partitions' work the grace period, then abandon what is left.

        Returns the offsets the consumer commits for them; the delivery settles their
        finished work first (exactly-once commits it in a transaction and returns none).
        """
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._settings.consumer.shutdown_grace_s
        tasks = [t for tp in partitions for t in self._tasks.get(tp, ())]
        if tasks:
            log.info("finishing in-flight work of revoked partitions", extra={"count": len(tasks)})
            await asyncio.wait(tasks, timeout=self._settings.consumer.shutdown_grace_s)
        offsets = await self._delivery.revoked(partitions, give_up_at)
        for tp in partitions:
            self._abandon(tp)
        return offsets

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        for tp in partitions:
            self._abandon(tp)

    # -- state for the app ---------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    def final_offsets(self) -> dict[Partition, int]:
        """At shutdown: the offsets the consumer commits as its own (the delivery's)."""
        return self._delivery.final_offsets()

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self._idle.is_set()

    def stop_intake(self) -> None:
        """Process no message handed over from now on (shutdown)."""
        self._intake = False

    def abandon_all(self) -> None:
        partitions = set(self._tasks) | self._delivery.holding() | set(self._tracker.partitions())
        for tp in partitions:
            self._abandon(tp)

    def _abandon(self, tp: Partition) -> None:
        for task in self._tasks.pop(tp, ()):
            task.cancel()
        self._epochs[tp] += 1
        self._tracker.forget(tp)
        self._delivery.dropped(tp)

    # -- Host, for the delivery ----------------------------------------------------------

    def is_current(self, tp: Partition, epoch: int) -> bool:
        return self._epochs[tp] == epoch

    def committable(self, tp: Partition) -> int | None:
        return self._tracker.committable(tp)

    def committable_offsets(self) -> dict[Partition, int]:
        offsets = {}
        for tp in self._tracker.partitions():
            committable = self._tracker.committable(tp)
            if committable is not None:
                offsets[tp] = committable
        return offsets

    def release(self, count: int) -> None:
        """`count` events left the in-flight window: tell the source, report idle as due."""
        self._done(count)

    def _done(self, count: int) -> None:
        """`count` events left the in-flight window: tell the source, report idle as due."""
        self._inflight -= count
        self._metrics.inflight.set(self._inflight)
        self._source.release(count)
        if self._inflight == 0:
            self._idle.set()

    # -- one event -----------------------------------------------------------------------

    async def _process(self, tp: Partition, offset: int, message: Message, epoch: int) -> bool:
        """Answer one event; False when it is left for redelivery (`_settle` books it)."""
        retries = self._backoff.retries()
        while True:
            try:
                await self._answer(message, epoch)
                return True
            except InfrastructureError as exc:
                # A dependency is down: the event is not at fault. Try it again until
                # shutdown gives up, then leave its offset unstored for redelivery.
                # A fault that retrying cannot mend (the model broke its contract)
                # stops the service instead.
                if not exc.retryable:
                    log.error("fatal error; stopping", extra={"error": exc.message})
                    self._on_fatal(exc)
                if self._stop.is_set() or not exc.retryable:
                    log.warning(
                        "event left for redelivery",
                        extra={"partition": tp[1], "offset": offset, "error": exc.message},
                    )
                    return False
                self._metrics.retries.labels(stage=exc.stage).inc()
                await retries.wait(self._stop)

    def _settle(self, tp: Partition, offset: int, epoch: int, task: asyncio.Task[bool]) -> None:
        """Book a finished `_process` task: offsets, and the in-flight window.

        A done callback rather than a `finally` in `_process`: a task cancelled before it
        ever ran (its partition abandoned in the loop iteration that created it) runs no
        code of its own, and would otherwise stay in flight for good.
        """
        self._tasks.get(tp, set()).discard(task)
        answered = False
        if not task.cancelled():
            error = task.exception()
            if error is not None:
                log.error(
                    "event processing failed",
                    extra={"partition": tp[1], "offset": offset, "error": repr(error)},
                    exc_info=error,
                )
            else:
                answered = task.result()
        if answered and self._epochs[tp] == epoch:
            committable = self._tracker.finish(tp, offset)
            if self._delivery.answered(tp, committable):
                return  # in flight until the delivery releases it
        self._done(1)

    async def _answer(self, message: Message, epoch: int) -> None:
        watch = _Stopwatch()
        try:
            value = message.value() or b""
            if self._codec.needs_registry(value):
                # The first event of a schema id asks the registry over HTTP: not on the loop.
                event = await asyncio.to_thread(self._codec.decode_uploaded, value)
            else:
                event = self._codec.decode_uploaded(value)
            # Fetching outruns decoding: without this bound, fetched bytes would pile up in
            # memory in front of the decode threads (each up to fetch.max_bytes).
            async with self._image_slots:
                started = time.perf_counter()
                async with self._fetch_slots:
                    fetched = await self._fetcher.fetch(event.image_url)
                watch.fetch_s = time.perf_counter() - started
                watch.attempts = fetched.attempts
                if fetched.attempts > 1:
                    self._fetch_retries.inc(fetched.attempts - 1)
                data = fetched.data
                del fetched
                image, watch.decode_s = await self._decoder.decode(data, self._model.image_size)
                del data
            result = await self._batcher.submit(image)
            watch.queue_s, watch.infer_s = result.queue_s, result.infer_s
            prediction = postprocess(result.probabilities, self._model.labels, self._threshold)
        except BadInputError as exc:
            # A fetch error carries the attempts its fetch made; an error after a fetch,
            # the attempts of that fetch (the stopwatch's).
            await self._dead_letter(message, exc, max(exc.attempts, watch.attempts), epoch)
            return

        # Written without validation (see suggestion_record); the tests decode what the
        # service publishes with validation.
        suggestion = suggestion_record(
            event,
            prediction,
            threshold=self._threshold,
            model_name=self._model.name,
            model_version=self._model.version,
            fetch_s=watch.fetch_s,
            preprocess_s=watch.decode_s,
            inference_s=watch.queue_s + watch.infer_s,
        )
        record = OutputRecord(
            self._settings.kafka.output_topic,
            event.listing_id.encode(),
            self._codec.encode_suggestion_record(suggestion),
        )
        self._fetch_latency.observe(watch.fetch_s)
        self._decode_latency.observe(watch.decode_s)
        await self._emit(message, record, epoch, uploaded_at=event.uploaded_at)
        self._suggested.inc()
        (self._confident if prediction.confident else self._not_confident).inc()

    async def _dead_letter(
        self, message: Message, exc: SuggesterError, attempts: int, epoch: int
    ) -> None:
        info = DlqInfo.for_error(
            exc,
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            attempts=attempts,
            service_version=__version__,
        )
        record = dead_letter_record(
            message,
            info,
            topic=self._settings.kafka.dlq_topic,
            max_record_bytes=self._settings.kafka.max_record_bytes,
        )
        try:
            await self._emit(message, record, epoch, uploaded_at=None)
        except RecordTooLargeError:
            # The original cannot travel: dead-letter the reason without the value, rather
            # than retry a record no broker will take (the partition would stall).
            await self._emit(message, without_value(record), epoch, uploaded_at=None)
        log.info(
            "event dead-lettered",
            extra={
                "partition": message.partition(),
                "offset": message.offset(),
                "stage": exc.stage,
                "reason": exc.reason,
            },
        )
        self._metrics.dlq.labels(stage=exc.stage, reason=exc.reason).inc()
        self._metrics.events.labels(outcome="dead_lettered").inc()

    async def _emit(
        self, message: Message, record: OutputRecord, epoch: int, *, uploaded_at: datetime | None
    ) -> None:
        tp = (message.topic() or "", message.partition() or 0)
        await self._delivery.deliver(
            tp, message.offset() or 0, epoch, record, uploaded_at=uploaded_at
        )


def confidence_threshold(settings: Settings, model: ModelInfo) -> float:
    """The threshold for `confident`: set explicitly, else the model's, else the default."""
    postprocess_settings = settings.postprocess
    if "confidence_threshold" in postprocess_settings.model_fields_set:
        return postprocess_settings.confidence_threshold
    if model.confidence_threshold is not None:
        return model.confidence_threshold
    return postprocess_settings.confidence_threshold
