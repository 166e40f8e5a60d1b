"""What exactly-once delivery costs against at-least-once, with no fault (chaos only).

Its behaviour under faults is proved by the fault tests that run in both modes
(test_consumer_crash.py, test_broker_crash.py, test_publish_failure.py) and by
test_transaction_steps.py."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import Consumer

from devstack.kafka import KafkaBroker
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    BOTH_MODES,
    CODEC,
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    tiny_photos,
)
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration


def _visible_latency_ms(bootstrap: str, topics: Topics, flow: EventFlow, count: int) -> list[float]:
    """Per answer: from the event's uploaded_at to when a read_committed reader receives
    it (what downstream sees; in exactly-once mode that includes the transaction wait)."""
    uploaded: dict[str, float] = {}
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"latency-{topics.group}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    reader.subscribe([topics.output])
    latencies: list[float] = []
    deadline = time.monotonic() + 300
    try:
        while len(latencies) < count and time.monotonic() < deadline:
            message = reader.poll(0.1)
            if message is None or message.error():
                continue
            received = time.time()
            source = str(CODEC.decode_suggestion(message.value()).source_event_id)
            # The flow is still producing: take in the events it has made since.
            for event in flow.events[len(uploaded) :]:
                uploaded[str(event.event_id)] = event.uploaded_at.timestamp()
            if source in uploaded:
                latencies.append((received - uploaded[source]) * 1000)
    finally:
        reader.close()
    return sorted(latencies)


@pytest.mark.chaos
@pytest.mark.timeout(900)
@BOTH_MODES
def test_cost_of_exactly_once_latency_and_throughput(
    mode: str,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    """Not a pass/fail benchmark: one process, the fast model, latency at 100 events/s
    as a read_committed reader sees it, then the rate at which a backlog drains."""
    urls = tiny_photos(image_origin, "cost")
    # The default in-flight window: an answer in exactly-once mode holds its slot until
    # its transaction commits, so a small window would measure the window.
    defaults = {
        "SUGGESTER_CONSUMER__MAX_INFLIGHT": "512",
        "SUGGESTER_CONSUMER__RESUME_INFLIGHT": "256",
        "SUGGESTER_CONSUMER__POLL_BATCH": "256",
    }
    group = ServiceGroup(start_service, 1, env={"SUGGESTER_DELIVERY": mode} | defaults).start()
    paced = 2000
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, paced, rate=100).start()
    latencies = _visible_latency_ms(kafka.bootstrap_servers, topics, flow, paced)
    flow.join()
    assert len(latencies) == paced

    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    backlog = 6000
    started = time.monotonic()
    EventFlow(kafka.bootstrap_servers, topics.input, urls, backlog, rate=None).start().join()
    watch.answered(paced + backlog, timeout_s=300)
    drain_rate = backlog / (time.monotonic() - started)
    # Exactly-once: from an answer being ready to its transaction committing.
    publish_s = group.metric('suggester_stage_latency_seconds_sum{stage="publish"}')
    publish_n = group.metric('suggester_stage_latency_seconds_count{stage="publish"}')
    assert group.terminate_all() == [0]
    totals = watch.final_totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            "cost (no fault)",
            mode,
            totals,
            {
                "p50_ms_at_100_per_s": latencies[len(latencies) // 2],
                "p99_ms_at_100_per_s": latencies[int(len(latencies) * 0.99)],
                "backlog_events_per_s": drain_rate,
                "publish_stage_mean_ms": 1000 * publish_s / max(publish_n, 1),
            },
        )
    )
    assert totals.lost == 0
    assert totals.duplicated == 0
