"""`python -m category_suggester replay-dlq` against the real broker."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Consumer, Producer

from category_suggester.events import DLQ_VALUE_OMITTED_HEADER, dlq_headers
from category_suggester.ops.replay_dlq import replay_dlq
from category_suggester.settings import KafkaSettings, Settings
from devstack.kafka import KafkaBroker
from tests.conftest import Topics
from tests.support.kafka import make_dlq_info


def dlq_record(reason: str, offset: int) -> list[tuple[str, bytes]]:
    info = make_dlq_info(
        error_class="FetchFailedError",
        reason=reason,
        message="origin said 503",
        original_offset=offset,
        attempts=3,
        service_version="test",
    )
    return [("trace-id", b"t-%d" % offset), *dlq_headers(info)]


def read_all(
    bootstrap: str, topic: str, expect: int
) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    records = []
    try:
        for _ in range(100):
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                headers = dict(message.headers() or [])
                records.append((message.key(), message.value(), headers))
            if len(records) >= expect and message is None:
                break
    finally:
        consumer.close()
    return records


@pytest.mark.timeout(180)
def test_replay_republishes_records_skips_omitted_values_and_ends_past_transaction_markers(
    kafka: KafkaBroker, topics: Topics, capsys: pytest.CaptureFixture[str]
) -> None:
    bootstrap = kafka.bootstrap_servers
    # What an exactly-once service writes: DLQ records inside transactions, whose commit
    # markers take offsets that no reader ever receives.
    producer = Producer(
        {"bootstrap.servers": bootstrap, "transactional.id": f"dlq-writer-{uuid.uuid4()}"}
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topics.dlq, key=b"k1", value=b"event-1", headers=dlq_record("fetch_failed", 1))
    producer.produce(
        topics.dlq,
        key=b"k2",
        value=b"",
        headers=[*dlq_record("too_large", 2), (DLQ_VALUE_OMITTED_HEADER, b"2000000")],
    )
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topics.dlq, key=b"k3", value=b"event-3", headers=dlq_record("http_status", 3))
    producer.commit_transaction(30)
    settings = Settings(
        kafka=KafkaSettings(
            bootstrap_servers=bootstrap, input_topic=topics.input, dlq_topic=topics.dlq
        )
    )
    group = f"replay-{uuid.uuid4()}"

    assert replay_dlq(settings, reasons=["http_status"], dry_run=True, group=group) == 1
    assert replay_dlq(settings, group=group) == 2

    out = capsys.readouterr().out
    assert "would replay" in out
    assert "skip" in out
    assert "2000000 bytes" in out
    replayed = read_all(bootstrap, topics.input, expect=2)
    assert sorted((key, value) for key, value, _ in replayed) == [
        (b"k1", b"event-1"),
        (b"k3", b"event-3"),
    ]
    for _, _, headers in replayed:
        assert headers["trace-id"].startswith(b"t-")
        assert not any(name.startswith("dlq.") for name in headers)
    # The group's position was committed: a second run finds nothing new.
    assert replay_dlq(settings, group=group) == 0
