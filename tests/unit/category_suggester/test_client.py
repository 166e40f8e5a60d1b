"""The answer reader of produce-sample and the try-a-photo page (category_suggester/client.py)."""

from __future__ import annotations

import pytest
from confluent_kafka import Message

from category_suggester.client import read_answer, sample_event
from category_suggester.errors import EventDecodeError
from category_suggester.events import EventCodec, dlq_headers
from tests.support.kafka import make_dlq_info, make_suggestion

CODEC = EventCodec()


def dead_letter(value: bytes, reason: str = "not_an_image") -> Message:
    info = make_dlq_info(reason=reason, original_offset=3)
    return Message(topic="in.dlq", key=b"listing-1", value=value, headers=dlq_headers(info))


def test_a_suggestion_answers_its_source_event() -> None:
    suggestion = make_suggestion()
    message = Message(topic="out", key=b"listing-1", value=CODEC.encode_suggestion(suggestion))
    answer = read_answer(message, CODEC, "out")
    assert answer.event_id == str(suggestion.source_event_id)
    assert answer.key == "listing-1"
    assert answer.suggestion == suggestion
    assert answer.dead_letter is None


def test_a_dead_letter_answers_the_event_in_its_value() -> None:
    event = sample_event("http://127.0.0.1:8090/a.jpg")
    answer = read_answer(dead_letter(CODEC.encode_uploaded(event)), CODEC, "out")
    assert answer.event_id == str(event.event_id)
    assert answer.suggestion is None
    assert answer.dead_letter is not None
    assert (answer.dead_letter.stage, answer.dead_letter.reason) == ("fetch", "not_an_image")


def test_a_dead_letter_whose_value_does_not_decode_has_no_event_id() -> None:
    answer = read_answer(dead_letter(b"not avro", "event_undecodable"), CODEC, "out")
    assert answer.event_id is None
    assert answer.dead_letter is not None
    assert answer.dead_letter.reason == "event_undecodable"


def test_a_dead_letter_without_its_headers_does_not_decode() -> None:
    message = Message(topic="in.dlq", key=b"k", value=b"v", headers=[("dlq.stage", b"fetch")])
    with pytest.raises(EventDecodeError):
        read_answer(message, CODEC, "out")
