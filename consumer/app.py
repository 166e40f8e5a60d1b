"""The one place where the steps are wired together.

    consume -> decode event -> fetch -> preprocess -> batch -> infer -> postprocess -> publish
                    └──────────── bad input ───────────────────────────────────────> DLQ

Every consumed message becomes one task that ends in exactly one of: a suggestion
acknowledged by Kafka, a DLQ record acknowledged by Kafka (bad input), or nothing (an
infrastructure fault outlasted shutdown; the offset stays uncommitted and the event is
consumed again). Offsets are stored only for the first two, and only when every earlier
offset of the partition is done (offsets.py).

Back-pressure: when `consumer.max_inflight` events are in flight every partition is
paused (polling goes on, so the group does not evict us); they resume at
`consumer.resume_inflight`. Each step bounds its own concurrency as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Message
from confluent_kafka.schema_registry import SchemaRegistryClient
from prometheus_client import CollectorRegistry

from consumer import __version__
from consumer.batch import Batcher
from consumer.consume import KafkaSource, Partition
from consumer.errors import BadInputError, InfrastructureError, PublishError, SuggesterError
from consumer.events import (
    CategoryScore,
    CategorySuggestion,
    DlqInfo,
    EventCodec,
    StageTimings,
    dlq_headers,
    without_dlq_headers,
)
from consumer.fetch import ImageFetcher
from consumer.health import HealthServer
from consumer.infer import ModelInfo, TritonClassifier
from consumer.metrics import Metrics
from consumer.offsets import OffsetTracker
from consumer.postprocess import postprocess
from consumer.preprocess import Decoder
from consumer.publish import Publisher
from consumer.settings import DeliveryMode, Settings

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
        publisher: Publisher,
        model: ModelInfo,
        stop: asyncio.Event,
        on_fatal: Callable[[SuggesterError], None],
    ) -> None:
        self._settings = settings
        self._on_fatal = on_fatal
        self._metrics = metrics
        self._codec = codec
        self._fetcher = fetcher
        self._decoder = decoder
        self._batcher = batcher
        self._publisher = publisher
        self._model = model
        # Set when the shutdown grace period is over: retries of outages give up then.
        self._stop = stop
        self._fetch_slots = asyncio.Semaphore(settings.fetch.concurrency)
        self._tracker = OffsetTracker()
        self._tasks: dict[Partition, dict[int, asyncio.Task[None]]] = defaultdict(dict)
        self._inflight = 0
        self._paused = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.source: KafkaSource | None = None

    # -- PartitionHandler ----------------------------------------------------------------

    def on_messages(self, messages: Sequence[Message]) -> None:
        for message in messages:
            tp = (message.topic() or "", message.partition() or 0)
            offset = message.offset() or 0
            self._tracker.track(tp, offset)
            task = asyncio.create_task(self._process(tp, offset, message))
            self._tasks[tp][offset] = task
        self._inflight += len(messages)
        self._metrics.inflight.set(self._inflight)
        self._idle.clear()
        if self._inflight >= self._settings.consumer.max_inflight and not self._paused:
            self._paused = True
            assert self.source is not None
            self.source.pause_all()

    def on_assigned(self, partitions: Sequence[Partition]) -> None:
        for tp in partitions:
            self._tracker.forget(tp)

    async def on_revoked(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Give the moving partitions' work the grace period, then abandon what is left."""
        tasks = [t for tp in partitions for t in self._tasks.get(tp, {}).values()]
        if tasks:
            log.info("finishing in-flight work of revoked partitions", extra={"count": len(tasks)})
            await asyncio.wait(tasks, timeout=self._settings.consumer.shutdown_grace_s)
        offsets: dict[Partition, int] = {}
        for tp in partitions:
            committable = self._tracker.committable(tp)
            if committable is not None:
                offsets[tp] = committable
            self._abandon(tp)
        return offsets

    def on_lost(self, partitions: Sequence[Partition]) -> None:
        for tp in partitions:
            self._abandon(tp)

    # -- state for the app ---------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return self._inflight

    def committable(self) -> dict[Partition, int]:
        offsets = {}
        for tp in self._tracker.partitions():
            committable = self._tracker.committable(tp)
            if committable is not None:
                offsets[tp] = committable
        return offsets

    async def wait_idle(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        return self._idle.is_set()

    def abandon_all(self) -> None:
        for tp in list(self._tasks):
            self._abandon(tp)

    def _abandon(self, tp: Partition) -> None:
        for task in self._tasks.pop(tp, {}).values():
            task.cancel()
        self._tracker.forget(tp)

    # -- one event -----------------------------------------------------------------------

    async def _process(self, tp: Partition, offset: int, message: Message) -> None:
        answered = False
        delay = self._settings.triton.retry_backoff_base_s
        try:
            while not answered:
                try:
                    await self._answer(message)
                    answered = True
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
                        return
                    self._metrics.retries.labels(stage=exc.stage).inc()
                    await _wait_or_stop(self._stop, random.uniform(0, delay))  # noqa: S311
                    delay = min(delay * 2, self._settings.triton.retry_backoff_max_s)
        finally:
            self._tasks.get(tp, {}).pop(offset, None)
            self._inflight -= 1
            self._metrics.inflight.set(self._inflight)
            if answered:
                committable = self._tracker.finish(tp, offset)
                if committable is not None and self.source is not None:
                    self.source.store({tp: committable})
            if self._paused and self._inflight <= self._settings.consumer.resume_inflight:
                self._paused = False
                if self.source is not None:
                    self.source.resume_all()
            if self._inflight == 0:
                self._idle.set()

    async def _answer(self, message: Message) -> None:
        watch = _Stopwatch()
        try:
            event = self._codec.decode_uploaded(message.value() or b"")
            started = time.perf_counter()
            async with self._fetch_slots:
                fetched = await self._fetcher.fetch(event.image_url)
            watch.fetch_s = time.perf_counter() - started
            watch.attempts = fetched.attempts
            if fetched.attempts > 1:
                self._metrics.retries.labels(stage="fetch").inc(fetched.attempts - 1)
            image, watch.decode_s = await self._decoder.decode(fetched.data, self._model.image_size)
            result = await self._batcher.submit(image)
            watch.queue_s, watch.infer_s = result.queue_s, result.infer_s
            prediction = postprocess(
                result.probabilities,
                self._model.labels,
                self._settings.postprocess.confidence_threshold,
            )
        except BadInputError as exc:
            await self._dead_letter(message, exc, getattr(exc, "attempts", watch.attempts))
            return

        now = datetime.now(UTC)
        total_s = max(0.0, (now - event.uploaded_at).total_seconds())
        suggestion = CategorySuggestion(
            event_id=uuid.uuid4(),
            source_event_id=event.event_id,
            listing_id=event.listing_id,
            image_id=event.image_id,
            category=prediction.category,
            score=prediction.score,
            scores=tuple(
                CategoryScore(category=s.category, score=s.score) for s in prediction.scores
            ),
            confident=prediction.confident,
            confidence_threshold=self._settings.postprocess.confidence_threshold,
            model_name=self._model.name,
            model_version=self._model.version,
            timings=StageTimings(
                fetch_ms=watch.fetch_s * 1000,
                preprocess_ms=watch.decode_s * 1000,
                inference_ms=(watch.queue_s + watch.infer_s) * 1000,
                total_ms=total_s * 1000,
            ),
            produced_at=now,
        )
        started = time.perf_counter()
        await self._publish(
            self._settings.kafka.output_topic,
            event.listing_id.encode(),
            self._codec.encode_suggestion(suggestion),
        )
        published = time.perf_counter()
        stage = self._metrics.stage_latency
        stage.labels(stage="fetch").observe(watch.fetch_s)
        stage.labels(stage="decode").observe(watch.decode_s)
        stage.labels(stage="publish").observe(published - started)
        uploaded = event.uploaded_at.timestamp()
        self._metrics.end_to_end_latency.observe(max(0.0, time.time() - uploaded))
        self._metrics.events.labels(outcome="suggested").inc()
        self._metrics.suggestions.labels(confident=str(prediction.confident).lower()).inc()

    async def _dead_letter(self, message: Message, exc: SuggesterError, attempts: int) -> None:
        info = DlqInfo.for_error(
            exc,
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            attempts=attempts,
            service_version=__version__,
        )
        headers = original_headers(message) + dlq_headers(info)
        await self._publish(
            self._settings.kafka.dlq_topic, message.key(), message.value() or b"", headers
        )
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

    async def _publish(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Publish until acknowledged; a broker fault is retried, never dead-lettered."""
        delay = self._settings.triton.retry_backoff_base_s
        while True:
            try:
                await self._publisher.publish(topic, key, value, headers)
                return
            except PublishError as exc:
                if self._stop.is_set():
                    raise
                self._metrics.retries.labels(stage="publish").inc()
                log.warning(
                    "publish failed; retrying", extra={"topic": topic, "error": exc.message}
                )
                await _wait_or_stop(self._stop, random.uniform(0, delay))  # noqa: S311
                delay = min(delay * 2, self._settings.triton.retry_backoff_max_s)


def original_headers(message: Message) -> list[tuple[str, bytes]]:
    """The message's headers as a list, less any `dlq.*` ones from an earlier trip."""
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    as_bytes = [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]
    return [(k, v) for k, v in without_dlq_headers(as_bytes) if v is not None]


async def _wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def make_codec(settings: Settings) -> EventCodec:
    """The event codec: Confluent framing with a registry, single-object encoding without."""
    registry = None
    if settings.registry.url:
        conf = {"url": settings.registry.url}
        if settings.registry.basic_auth_user_info is not None:
            conf["basic.auth.user.info"] = settings.registry.basic_auth_user_info.get_secret_value()
        registry = SchemaRegistryClient.new_client(conf)
    return EventCodec(
        registry,
        input_topic=settings.kafka.input_topic,
        output_topic=settings.kafka.output_topic,
    )


class Service:
    """The running service: builds every step from settings and owns their lifetimes."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        if settings.delivery is DeliveryMode.EXACTLY_ONCE:
            raise NotImplementedError("delivery=exactly_once is not available in this build")
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self._shutdown = asyncio.Event()
        self._give_up = asyncio.Event()
        self.health: HealthServer | None = None
        self._source: KafkaSource | None = None
        self._classifier: TritonClassifier | None = None
        # Set when a fault that retrying cannot mend stopped the service.
        self.failure: SuggesterError | None = None

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def _fatal(self, error: SuggesterError) -> None:
        self.failure = error
        self._shutdown.set()

    async def run(self) -> None:
        settings = self.settings
        metrics = self.metrics
        classifier = TritonClassifier(settings.triton, metrics, stop=self._give_up)
        self._classifier = classifier
        self.health = HealthServer(
            self.registry,
            alive=self._alive,
            ready=self._ready,
            host=settings.observability.host,
            port=settings.observability.port,
        )
        await self.health.start()
        model = await classifier.connect()
        metrics.build_info.info(
            {"version": __version__, "model_name": model.name, "model_version": model.version}
        )
        log.info(
            "model ready",
            extra={"model": model.name, "version": model.version, "size": model.image_size},
        )
        codec = make_codec(settings)
        await asyncio.to_thread(codec.prepare)
        publisher = Publisher(settings)
        publisher.start()
        async with contextlib.AsyncExitStack() as resources:
            decoder = resources.enter_context(Decoder(settings.decode))
            fetcher = await resources.enter_async_context(ImageFetcher(settings.fetch))
            batcher = Batcher(classifier, model, settings.triton, metrics)
            pipeline = Pipeline(
                settings,
                metrics,
                codec=codec,
                fetcher=fetcher,
                decoder=decoder,
                batcher=batcher,
                publisher=publisher,
                model=model,
                stop=self._give_up,
                on_fatal=self._fatal,
            )
            source = KafkaSource(settings, metrics, pipeline)
            pipeline.source = source
            self._source = source
            source.start()
            log.info("consuming", extra={"topic": settings.kafka.input_topic})
            await self._shutdown.wait()

            log.info("shutting down: draining in-flight events", extra={"count": pipeline.inflight})
            source.stop_polling()
            drained = await pipeline.wait_idle(settings.consumer.shutdown_grace_s)
            if not drained:
                log.warning(
                    "grace period over; abandoning in-flight events",
                    extra={"count": pipeline.inflight},
                )
            self._give_up.set()
            final_offsets = pipeline.committable()
            pipeline.abandon_all()
            await publisher.close()
            await source.close(final_offsets)
            await batcher.aclose()
        await classifier.aclose()
        await self.health.close()
        log.info("stopped")

    def _alive(self) -> bool:
        return self._source is None or self._source.alive

    async def _ready(self) -> bool:
        if self._classifier is None or self._source is None or not self._source.assigned:
            return False
        return await self._classifier.ready()
