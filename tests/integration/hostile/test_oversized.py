"""Events with strings of about 1 MB, under and over the service's event size limit.

The broker takes them (the test producer compresses, as a real one would); the service must
still answer each once: a refused URL or an oversized event is dead-lettered with its value
unchanged, and an id too long to use as a key is refused as breaking the contract.
"""

from __future__ import annotations

import pytest
from confluent_kafka import Producer

from category_suggester.events import DEFAULT_MAX_EVENT_BYTES, EventCodec, parse_dlq_headers
from devstack.kafka import KafkaBroker
from tests.conftest import ServiceFactory, Topics
from tests.corpus.events import EventCase, oversized_event_cases
from tests.corpus.images import encode, picture
from tests.support.kafka import read_answers
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

CODEC = EventCodec()


def _produce_compressed(bootstrap: str, topic: str, cases: list[EventCase]) -> None:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "compression.type": "lz4",
            "message.max.bytes": 4 * DEFAULT_MAX_EVENT_BYTES,
        }
    )
    for case in cases:
        producer.produce(topic, key=case.name.encode(), value=case.value)
    assert producer.flush(30) == 0


def test_megabyte_strings_are_answered_once_each(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    url = image_origin.add("oversized/good.jpg", encode(picture(1), "JPEG"))
    cases = oversized_event_cases(url, max_event_bytes=DEFAULT_MAX_EVENT_BYTES)
    service = start_service()
    service.wait_ready()
    _produce_compressed(kafka.bootstrap_servers, topics.input, cases)

    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=len(cases), timeout_s=20
    )

    assert not answers.suggestions
    by_key = {m.key(): m for ms in answers.dead_letters.values() for m in ms}
    assert set(by_key) == {c.name.encode() for c in cases}, service.log_tail()
    for case in cases:
        record = by_key[case.name.encode()]
        assert parse_dlq_headers(record.headers() or []).reason == case.expect, case.name
        assert record.value() == case.value, f"{case.name}: DLQ value changed"
    assert service.terminate() == 0
