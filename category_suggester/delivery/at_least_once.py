"""At-least-once delivery: each answer is published as soon as it is ready.

An input offset is stored (librdkafka commits stored offsets every
`consumer.commit_interval_s`) only once every earlier offset of its partition is
answered and acknowledged by the broker. A crash repeats the answers not yet committed
(at most the in-flight window plus one commit interval), and answers of one key may come
out of order. A revoke commits the moving partitions' finished prefix before they move.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from datetime import datetime

from category_suggester.consume import Partition, Source
from category_suggester.delivery import Host
from category_suggester.errors import PublishError
from category_suggester.metrics import Metrics
from category_suggester.publish import OutputRecord, Publisher
from category_suggester.retry import Backoff
from category_suggester.settings import Settings

log = logging.getLogger(__name__)


class AtLeastOnce:
    """Delivery through an idempotent `Publisher`; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        publisher: Publisher,
        *,
        source: Source,
        stop: asyncio.Event,
    ) -> None:
        """`source` stores the offsets; `stop` is set when the shutdown grace period is
        over: retries give up then."""
        self._settings = settings
        self._metrics = metrics
        self._publisher = publisher
        self._source = source
        self._stop = stop
        self._host: Host | None = None
        self._publish_latency = metrics.stage_latency.labels(stage="publish")
        self._publish_retries = metrics.retries.labels(stage="publish")
        self._backoff = Backoff(
            settings.kafka.retry_backoff_base_s, settings.kafka.retry_backoff_max_s
        )

    def bind(self, host: Host) -> None:
        self._host = host

    @property
    def taking(self) -> bool:
        return True

    async def deliver(
        self,
        tp: Partition,
        offset: int,
        epoch: int,
        record: OutputRecord,
        *,
        uploaded_at: datetime | None,
    ) -> None:
        # Published even when the partition moved on meanwhile: its next owner answers the
        # event again, which at-least-once allows, and the offset is not stored here.
        started = time.perf_counter()
        await self._publish(record)
        self._publish_latency.observe(time.perf_counter() - started)
        if uploaded_at is not None:
            latency = max(0.0, time.time() - uploaded_at.timestamp())
            self._metrics.end_to_end_latency.observe(latency)

    def answered(self, tp: Partition, committable: int | None) -> bool:
        if committable is not None:
            self._source.store({tp: committable})
        return False

    async def revoked(
        self, partitions: Sequence[Partition], give_up_at: float
    ) -> dict[Partition, int]:
        assert self._host is not None
        offsets: dict[Partition, int] = {}
        for tp in partitions:
            committable = self._host.committable(tp)
            if committable is not None:
                offsets[tp] = committable
        return offsets

    def dropped(self, tp: Partition) -> None:
        pass

    def holding(self) -> set[Partition]:
        return set()

    def final_offsets(self) -> dict[Partition, int]:
        assert self._host is not None
        return self._host.committable_offsets()

    def start(self) -> None:
        pass

    async def finish(self) -> None:
        pass

    async def close(self) -> None:
        await self._publisher.close()

    async def _publish(self, record: OutputRecord) -> None:
        """Publish until acknowledged; a broker fault is retried, never dead-lettered."""
        topic = record.topic
        retries = self._backoff.retries()
        while True:
            try:
                await self._publisher.publish(topic, record.key, record.value, record.headers)
                return
            except PublishError as exc:
                # A producer broken for good (a fatal idempotence error) is not retried:
                # the pipeline stops the service on it.
                if not exc.retryable or self._stop.is_set():
                    raise
                self._publish_retries.inc()
                log.warning(
                    "publish failed; retrying", extra={"topic": topic, "error": exc.message}
                )
                await retries.wait(self._stop)
