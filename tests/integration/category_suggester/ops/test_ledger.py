"""`python -m category_suggester ledger` against the real broker: the totals it prints, its
status."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Producer

from category_suggester.events import EventCodec, dlq_headers
from devstack.kafka import KafkaBroker
from tests.conftest import Topics
from tests.support.kafka import make_dlq_info, make_event, make_suggestion
from tests.support.python import run_python

pytestmark = pytest.mark.integration

CODEC = EventCodec()


def ledger(kafka: KafkaBroker, topics: Topics, status: int) -> dict[str, object]:
    done = run_python(
        "-m", "category_suggester", "ledger", "--input", topics.input, "--output", topics.output,
        "--dlq", topics.dlq, "--bootstrap", kafka.bootstrap_servers, "--timeout-s", "60",
        "--json", status=status,
    )  # fmt: skip
    totals: dict[str, object] = json.loads(done.stdout)
    return totals


@pytest.mark.timeout(240)
def test_the_ledger_passes_only_when_every_event_is_answered_exactly_once(
    kafka: KafkaBroker, topics: Topics
) -> None:
    answered, pending = make_event("http://o/a.jpg"), make_event("http://o/b.jpg")
    producer = Producer({"bootstrap.servers": kafka.bootstrap_servers})
    for event in (answered, pending):  # offsets 0 and 1 of partition 0
        producer.produce(
            topics.input, key=event.listing_id.encode(), value=CODEC.encode_uploaded(event),
            partition=0,
        )  # fmt: skip
    suggestion = make_suggestion(source_event_id=answered.event_id)
    producer.produce(topics.output, key=b"k", value=CODEC.encode_suggestion(suggestion))
    assert producer.flush(30) == 0

    totals = ledger(kafka, topics, status=1)
    assert (totals["events"], totals["answered_once"], totals["lost"]) == (2, 1, 1)
    assert (totals["suggested"], totals["complete"]) == (1, True)
    assert totals["lost_sample"] == ["0:1"]

    info = make_dlq_info(original_topic=topics.input, original_partition=0, original_offset=1)
    value = CODEC.encode_uploaded(pending)
    producer.produce(topics.dlq, key=b"k", value=value, headers=dlq_headers(info))
    assert producer.flush(30) == 0
    totals = ledger(kafka, topics, status=0)
    assert (totals["answered_once"], totals["duplicated"], totals["lost"]) == (2, 0, 0)
    assert totals["dead_lettered"] == {"not_an_image": 1}

    producer.produce(topics.output, key=b"k", value=CODEC.encode_suggestion(suggestion))
    assert producer.flush(30) == 0
    totals = ledger(kafka, topics, status=1)
    assert (totals["answered_once"], totals["duplicated"], totals["extra_answers"]) == (1, 1, 1)
    assert totals["duplicated_sample"] == ["0:0"]
