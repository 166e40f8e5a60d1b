"""Publishing fails (the output topic is deleted): no input offset moves until it works."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions
from confluent_kafka.admin import AdminClient

from devstack.kafka import KafkaBroker
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    BOTH_MODES,
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    tiny_photos,
)
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

PUBLISH_RETRIES = 'suggester_retries_total{stage="publish"}'


def committed(admin: AdminClient, topics: Topics) -> int:
    """The group's committed input offsets, summed over partitions (-1001: none, as 0)."""
    request = ConsumerGroupTopicPartitions(topics.group)
    result = admin.list_consumer_group_offsets([request])[topics.group].result()
    return sum(max(tp.offset, 0) for tp in result.topic_partitions if tp.topic == topics.input)


@BOTH_MODES
def test_output_topic_deleted_advances_no_offset_and_loses_nothing_once_back(
    mode: str,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap_servers})
    urls = tiny_photos(image_origin, "publish")
    group = ServiceGroup(
        start_service,
        1,
        env={
            "SUGGESTER_DELIVERY": mode,
            # A deleted topic's records fail once this passes (librdkafka's default: 30 s).
            "SUGGESTER_KAFKA__EXTRA": '{"topic.metadata.propagation.max.ms": "5000"}',
        },
    ).start()
    admin.delete_topics([topics.output])[topics.output].result()
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, 200, rate=50).start()
    flow.join()
    # Publishing fails and is retried; the offsets of the events stay where they were.
    retries = group.metric(PUBLISH_RETRIES)
    failing_since = time.monotonic()
    while group.metric(PUBLISH_RETRIES) < retries + 3:
        assert time.monotonic() - failing_since < 120, group.logs()
        assert committed(admin, topics) == 0
    assert committed(admin, topics) == 0
    failing_s = time.monotonic() - failing_since

    kafka.create_topics({topics.output: topics.partitions})
    recreated_at = time.monotonic()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    watch.answered(200, timeout_s=180, diagnostics=group.logs)
    recovery_s = time.monotonic() - recreated_at
    assert group.terminate_all() == [0]
    totals = watch.final_totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            "output topic deleted",
            f"{mode} 200 events",
            totals,
            {"failing_observed_s": failing_s, "recovery_after_recreate_s": recovery_s},
        )
    )
    assert committed(admin, topics) == 200
    assert totals.lost == 0, totals.lost_sample
    assert totals.dead_lettered_total == 0
    if mode == "exactly_once":
        assert totals.duplicated == 0
