"""The service seen from its clients: the event a client publishes and the answer it reads.

Used by `produce-sample` (category_suggester/ops/produce_sample.py) and the try-a-photo page
(category_suggester/web.py), which publish `listing-image-uploaded` events and wait for what the
service answered to each: a `category-suggestion` on the output topic, or a record on
the dead-letter topic.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Message

from category_suggester.errors import EventDecodeError
from category_suggester.events import (
    CategorySuggestion,
    DlqInfo,
    EventCodec,
    ListingImageUploaded,
    parse_dlq_headers,
)


def sample_event(url: str) -> ListingImageUploaded:
    """A listing-image-uploaded event for `url`: fresh ids, uploaded now."""
    return ListingImageUploaded(
        event_id=uuid.uuid4(),
        listing_id=f"listing-{uuid.uuid4().hex[:12]}",
        image_id=f"image-{uuid.uuid4().hex[:12]}",
        image_url=url,
        uploaded_at=datetime.now(UTC),
    )


@dataclass(frozen=True)
class Answer:
    """What the service answered to one event: a suggestion, or a dead-letter record."""

    # The answered event's id; None for a DLQ record whose value does not decode.
    event_id: str | None
    key: str
    suggestion: CategorySuggestion | None = None
    dead_letter: DlqInfo | None = None


def read_answer(message: Message, codec: EventCodec, output_topic: str) -> Answer:
    """The answer in a record of the output topic or of the DLQ.

    A suggestion names its event (`source_event_id`); a DLQ record keeps the event's
    value unchanged, so its id is read from there. Raises `EventDecodeError` for a
    suggestion or DLQ headers that do not decode.
    """
    key = (message.key() or b"").decode(errors="replace")
    if message.topic() == output_topic:
        suggestion = codec.decode_suggestion(message.value())
        return Answer(str(suggestion.source_event_id), key, suggestion=suggestion)
    info = parse_dlq_headers(message.headers() or [])
    try:
        event_id: str | None = str(codec.decode_uploaded(message.value()).event_id)
    except EventDecodeError:
        event_id = None
    return Answer(event_id, key, dead_letter=info)
