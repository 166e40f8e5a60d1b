"""Produce test events and read back what the service answered."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import Consumer, Message, Producer

from category_suggester.events import (
    CategoryScore,
    CategorySuggestion,
    DlqInfo,
    EventCodec,
    ListingImageUploaded,
    StageTimings,
)


def make_event(url: str, **fields: object) -> ListingImageUploaded:
    values: dict[str, object] = {
        "event_id": uuid.uuid4(),
        "listing_id": f"listing-{uuid.uuid4().hex[:10]}",
        "image_id": f"image-{uuid.uuid4().hex[:10]}",
        "image_url": url,
        "uploaded_at": datetime.now(UTC),
    }
    values.update(fields)
    return ListingImageUploaded.model_validate(values)


def make_suggestion(**fields: object) -> CategorySuggestion:
    """A valid suggestion with one category; `fields` replace any of its values."""
    values: dict[str, object] = {
        "event_id": uuid.uuid4(),
        "source_event_id": uuid.uuid4(),
        "listing_id": "listing-1",
        "image_id": "image-1",
        "category": "books",
        "score": 0.9,
        "scores": (CategoryScore(category="books", score=0.9),),
        "confident": True,
        "confidence_threshold": 0.5,
        "model_name": "category_classifier",
        "model_version": "1",
        "timings": StageTimings(fetch_ms=1, preprocess_ms=1, inference_ms=1, total_ms=3),
        "produced_at": datetime.now(UTC),
    }
    values.update(fields)
    return CategorySuggestion.model_validate(values)


def make_dlq_info(**fields: object) -> DlqInfo:
    """Valid dead-letter headers: an image the fetch step refused; `fields` replace any."""
    values: dict[str, object] = {
        "error_class": "FetchRefusedError",
        "stage": "fetch",
        "reason": "not_an_image",
        "message": "body is not an image",
        "original_topic": "in",
        "original_partition": 0,
        "original_offset": 0,
        "attempts": 1,
        "failed_at": datetime.now(UTC),
        "service_version": "0.1.0",
    }
    values.update(fields)
    return DlqInfo.model_validate(values)


def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    count = 0
    for key, value in records:
        producer.produce(topic, key=key, value=value)
        count += 1
        if count % 1000 == 0:
            producer.poll(0)
    assert producer.flush(30) == 0, "test events were not acknowledged"
    return count


def produce_events(
    bootstrap: str, topic: str, events: Iterable[ListingImageUploaded], codec: EventCodec
) -> list[ListingImageUploaded]:
    events = list(events)
    produce(bootstrap, topic, ((e.listing_id.encode(), codec.encode_uploaded(e)) for e in events))
    return events


@dataclass
class Answers:
    suggestions: dict[str, list[CategorySuggestion]] = field(
        default_factory=lambda: defaultdict(list)
    )
    # DLQ records by the event id inside their (unchanged) value, or by "key:<key>".
    dead_letters: dict[str, list[Message]] = field(default_factory=lambda: defaultdict(list))

    def count(self) -> int:
        return sum(map(len, self.suggestions.values())) + sum(map(len, self.dead_letters.values()))


def read_answers(
    bootstrap: str,
    output_topic: str,
    dlq_topic: str,
    codec: EventCodec,
    *,
    expect: int,
    timeout_s: float = 120,
    settle_s: float = 0.0,
) -> Answers:
    """Read both topics from the start until `expect` answers arrived (or the timeout).

    With `settle_s`, keep reading that much longer after the last expected answer, so
    duplicates that arrive late are seen too.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"pytest-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    answers = Answers()
    try:
        consumer.subscribe([output_topic, dlq_topic])
        deadline = time.monotonic() + timeout_s
        settle_until: float | None = None
        while time.monotonic() < deadline:
            if settle_until is None and answers.count() >= expect:
                settle_until = time.monotonic() + settle_s
            if settle_until is not None and time.monotonic() >= settle_until:
                break
            message = consumer.poll(0.2)
            if message is None or message.error():
                continue
            if message.topic() == output_topic:
                suggestion = codec.decode_suggestion(message.value() or b"")
                answers.suggestions[str(suggestion.source_event_id)].append(suggestion)
            else:
                try:
                    event = codec.decode_uploaded(message.value() or b"")
                    ident = str(event.event_id)
                except Exception:
                    ident = f"key:{(message.key() or b'').decode(errors='replace')}"
                answers.dead_letters[ident].append(message)
    finally:
        consumer.close()
    return answers
