"""The running service: builds every part from settings, starts them in order, drains and
closes them in reverse.

`Parts` is the one place that makes the parts from settings. `Service.run` starts them in
this order, and one exit stack owns each from the moment it exists:

1. the health server (`/metrics`, `/healthz`, `/readyz`: probes answer during the start);
2. the Triton client: waits for Triton and the model and checks the model's contract;
3. the event codec: registers (or looks up) the output schema in the registry;
4. the decode threads; 5. the fetcher's connection pool; 6. the batcher;
7. the Kafka source: its consumer is created, not yet subscribed;
8. the delivery and its producer (exactly-once: registering the transactional.id fences
   an older process before a single offset is read);
9. the pipeline; the delivery's transaction loop and the source's poll thread start.

A start step that raises releases everything started before it, in reverse order, and
the error goes on to the caller. Shutdown (`request_shutdown`, or a fault that retrying
cannot mend) unwinds the same stack. First the drain: stop taking messages, stop polling,
wait for the in-flight events up to `consumer.shutdown_grace_s`, give up the retries, take
the final offsets, let the delivery settle what is ready, abandon the rest. Then the
closes, in reverse start order: the delivery's producer, the source (committing the final
offsets and leaving the group), the batcher, the fetcher, the decoder, the Triton client,
the health server. A close that raises does not keep the later ones from running; the
error is raised once they ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry

from category_suggester import __version__
from category_suggester.app import Pipeline
from category_suggester.batch import Batcher
from category_suggester.consume import KafkaSource, Partition, Source
from category_suggester.delivery import Delivery
from category_suggester.delivery.at_least_once import AtLeastOnce
from category_suggester.delivery.exactly_once import ExactlyOnce
from category_suggester.errors import KafkaRefusedError, SuggesterError
from category_suggester.events.codec import EventCodec, codec_from_settings
from category_suggester.fetch import ImageFetcher
from category_suggester.health import HealthServer
from category_suggester.infer import ModelInfo, TritonClassifier
from category_suggester.metrics import Metrics
from category_suggester.preprocess import Decoder
from category_suggester.publish import Publisher, TransactionalPublisher
from category_suggester.settings import DeliveryMode, Settings

log = logging.getLogger(__name__)


class Parts:
    """Makes each part of the service from settings, unstarted unless a method says so.

    The service starts, drains and closes what these return (module docstring). Tests
    replace a part by overriding its method.
    """

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(registry or CollectorRegistry())

    def health(
        self, *, alive: Callable[[], bool], ready: Callable[[], Awaitable[bool]]
    ) -> HealthServer:
        observability = self.settings.observability
        return HealthServer(
            self.metrics.registry,
            alive=alive,
            ready=ready,
            host=observability.host,
            port=observability.port,
        )

    def classifier(self, *, stop: asyncio.Event) -> TritonClassifier:
        return TritonClassifier(self.settings.triton, self.metrics, stop=stop)

    def codec(self) -> EventCodec:
        return codec_from_settings(self.settings)

    def decoder(self) -> Decoder:
        return Decoder(self.settings.decode)

    def fetcher(self) -> ImageFetcher:
        return ImageFetcher(self.settings.fetch)

    def batcher(self, classifier: TritonClassifier, model: ModelInfo) -> Batcher:
        return Batcher(classifier, model, self.settings.triton, self.metrics)

    def source(self, *, on_refused: Callable[[str], None]) -> KafkaSource:
        return KafkaSource(self.settings, self.metrics, on_refused=on_refused)

    async def delivery(
        self,
        source: Source,
        *,
        stop: asyncio.Event,
        on_fatal: Callable[[SuggesterError], None],
    ) -> Delivery:
        """The delivery of `settings.delivery`, its producer started."""
        settings = self.settings
        if settings.delivery is DeliveryMode.EXACTLY_ONCE:
            transactions = TransactionalPublisher(settings)
            # Fences an older process with the same transactional.id, aborting its open
            # transaction, before this one reads a single offset.
            await transactions.start()
            log.info(
                "exactly-once delivery", extra={"transactional_id": transactions.transactional_id}
            )
            return ExactlyOnce(
                settings, self.metrics, transactions, source=source, stop=stop, on_fatal=on_fatal
            )
        publisher = Publisher(settings)
        publisher.start()
        return AtLeastOnce(settings, self.metrics, publisher, source=source, stop=stop)


class Service:
    """The running service; see the module docstring."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.metrics = parts.metrics
        self._shutdown = asyncio.Event()
        # Set when the shutdown grace period is over: retries of outages give up then.
        self._give_up = asyncio.Event()
        # For the probes, once started.
        self._source: KafkaSource | None = None
        self._classifier: TritonClassifier | None = None
        # Set when a fault that retrying cannot mend stopped the service.
        self.failure: SuggesterError | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Service:
        return cls(Parts(settings))

    def request_shutdown(self) -> None:
        self._shutdown.set()

    def _fatal(self, error: SuggesterError) -> None:
        self.failure = error
        self._shutdown.set()

    async def run(self) -> None:
        """Start every part, serve until shutdown is requested (or a fatal fault), then
        drain and close. Raises what a start step raised, once what started is closed."""
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack)
            log.info("consuming", extra={"topic": self.settings.kafka.input_topic})
            await self._shutdown.wait()
        log.info("stopped")

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start the parts in order, each pushed on `stack` with its close."""
        parts, settings, metrics = self.parts, self.settings, self.metrics

        health = parts.health(alive=self._alive, ready=self._ready)
        await health.start()
        stack.push_async_callback(health.close)

        classifier = parts.classifier(stop=self._give_up)
        stack.push_async_callback(classifier.aclose)  # the channel opens in connect()
        model = await classifier.connect()
        self._classifier = classifier
        metrics.build_info.info(
            {"version": __version__, "model_name": model.name, "model_version": model.version}
        )
        log.info(
            "model ready",
            extra={"model": model.name, "version": model.version, "size": model.image_size},
        )

        codec = parts.codec()
        await asyncio.to_thread(codec.prepare)

        decoder = parts.decoder()
        stack.callback(decoder.close)
        fetcher = parts.fetcher()
        stack.push_async_callback(fetcher.aclose)
        batcher = parts.batcher(classifier, model)
        stack.push_async_callback(batcher.aclose)

        source = parts.source(on_refused=lambda why: self._fatal(KafkaRefusedError(why)))
        # The drain fills this in before the source closes; empty if it never ran.
        final_offsets: dict[Partition, int] = {}
        stack.push_async_callback(source.close, final_offsets)

        delivery = await parts.delivery(source, stop=self._give_up, on_fatal=self._fatal)
        stack.push_async_callback(delivery.close)

        pipeline = Pipeline(
            settings,
            metrics,
            codec=codec,
            fetcher=fetcher,
            decoder=decoder,
            batcher=batcher,
            delivery=delivery,
            source=source,
            model=model,
            stop=self._give_up,
            on_fatal=self._fatal,
        )
        stack.push_async_callback(self._drain, pipeline, source, delivery, final_offsets)
        delivery.start()
        source.start(pipeline)
        self._source = source

    async def _drain(
        self,
        pipeline: Pipeline,
        source: KafkaSource,
        delivery: Delivery,
        final_offsets: dict[Partition, int],
    ) -> None:
        """Finish or abandon the work in flight; leaves the final offsets in `final_offsets`."""
        log.info("shutting down: draining in-flight events", extra={"count": pipeline.inflight})
        pipeline.stop_intake()
        source.stop_polling()
        drained = await pipeline.wait_idle(self.settings.consumer.shutdown_grace_s)
        if not drained:
            log.warning(
                "grace period over; abandoning in-flight events",
                extra={"count": pipeline.inflight},
            )
        self._give_up.set()
        final_offsets.update(pipeline.final_offsets())
        await delivery.finish()
        pipeline.abandon_all()

    def _alive(self) -> bool:
        return self._source is None or self._source.alive

    async def _ready(self) -> bool:
        if self._classifier is None or self._source is None or not self._source.assigned:
            return False
        return await self._classifier.ready()
