"""Dead-letter headers and records (category_suggester/events/dlq.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from confluent_kafka import Message

from category_suggester.errors import EventDecodeError, FetchFailedError, FetchRefusedError
from category_suggester.events import dlq, schemas
from category_suggester.events.dlq import DlqInfo
from tests.support.events import INPUT_TOPIC


def test_dlq_header_constants_match_the_schema() -> None:
    schema = schemas.load_schema(schemas.DLQ_HEADERS_SCHEMA)
    headers = [(f["name"], f["header"]) for f in schema["fields"]]
    info = DlqInfo.for_error(
        FetchRefusedError("x"),
        topic="t",
        partition=0,
        offset=0,
        attempts=1,
        service_version="0",
    )
    assert [name for name, _ in dlq.dlq_headers(info)] == [h for _, h in headers]
    assert all(h.startswith(dlq.DLQ_HEADER_PREFIX) for _, h in headers)


def test_dlq_headers_round_trip() -> None:
    failed_at = datetime(2024, 5, 17, 9, 31, 0, 250000, tzinfo=UTC)
    info = DlqInfo.for_error(
        FetchRefusedError("host 10.0.0.1 is private", reason="address_refused"),
        topic=INPUT_TOPIC,
        partition=3,
        offset=123456789012,
        attempts=2,
        service_version="0.1.0",
        failed_at=failed_at,
    )
    headers = dlq.dlq_headers(info)
    assert dict(headers) == {
        "dlq.error.class": b"FetchRefusedError",
        "dlq.stage": b"fetch",
        "dlq.reason": b"address_refused",
        "dlq.message": b"host 10.0.0.1 is private",
        "dlq.original.topic": INPUT_TOPIC.encode(),
        "dlq.original.partition": b"3",
        "dlq.original.offset": b"123456789012",
        "dlq.attempts": b"2",
        "dlq.failed.at": b"1715938260250",
        "dlq.service.version": b"0.1.0",
    }
    others = [("traceparent", b"00-abc"), ("dlq.reason", b"older_failure")]
    assert dlq.parse_dlq_headers(others + headers) == info
    assert dlq.parse_dlq_headers(dict(headers)) == info
    assert dlq.without_dlq_headers(others + headers) == [("traceparent", b"00-abc")]


def test_dlq_for_any_exception_and_long_messages() -> None:
    info = DlqInfo.for_error(
        KeyError("é" * 2000),
        topic="t",
        partition=0,
        offset=0,
        attempts=1,
        service_version="v",
    )
    assert (info.error_class, info.stage, info.reason) == ("KeyError", "unknown", "error")
    assert len(info.message.encode()) <= dlq.DLQ_MESSAGE_MAX_BYTES
    assert info.message.encode().decode() == info.message  # cut on a character boundary
    assert info.failed_at.tzinfo is UTC


@pytest.mark.parametrize(
    "broken",
    [
        {"dlq.attempts": None},
        {"dlq.attempts": b"two"},
        {"dlq.attempts": b"0"},
        {"dlq.original.offset": b"1_000"},
        {"dlq.failed.at": b"9" * 30},
        {"dlq.stage": b"\xff"},
    ],
)
def test_broken_dlq_headers_raise_event_decode_error(broken: dict[str, bytes | None]) -> None:
    info = DlqInfo.for_error(
        FetchRefusedError("x"), topic="t", partition=0, offset=1, attempts=1, service_version="v"
    )
    headers = dict(dlq.dlq_headers(info))
    for name, value in broken.items():
        if value is None:
            del headers[name]
        else:
            headers[name] = value
    with pytest.raises(EventDecodeError) as caught:
        dlq.parse_dlq_headers(list(headers.items()))
    assert caught.value.reason == dlq.REASON_DLQ_HEADERS_INVALID
    with pytest.raises(EventDecodeError):
        dlq.parse_dlq_headers(None)


def failure(attempts: int = 1) -> DlqInfo:
    return DlqInfo.for_error(
        FetchFailedError("HTTP 503 from origin (attempt 3)", reason="http_status"),
        topic=INPUT_TOPIC,
        partition=1,
        offset=7,
        attempts=attempts,
        service_version="0.1.0",
    )


def test_a_dead_letter_record_keeps_the_original_and_says_why() -> None:
    message = Message(
        topic=INPUT_TOPIC, partition=1, offset=7, key=b"listing-1", value=b"\xc3\x01body",
        headers=[("trace", b"abc"), ("dlq.reason", b"an_earlier_trip"), ("empty", None)],
    )  # fmt: skip
    info = failure(attempts=3)

    record = dlq.dead_letter_record(message, info, topic="dlq", max_record_bytes=1_000_000)

    assert (record.topic, record.key, record.value) == ("dlq", b"listing-1", b"\xc3\x01body")
    assert list(record.headers) == [("trace", b"abc"), *dlq.dlq_headers(info)]
    assert dlq.parse_dlq_headers(record.headers) == info
    assert dict(record.headers)[dlq.DLQ_ATTEMPTS] == b"3"


def test_original_headers_are_bytes_without_dlq_ones_or_empty_ones() -> None:
    message = Message(
        topic=INPUT_TOPIC,
        headers=[("trace", "abc"), ("dlq.stage", b"fetch"), ("none", None), ("b", b"\x00")],
    )
    assert dlq.original_headers(message) == [("trace", b"abc"), ("b", b"\x00")]
    assert dlq.original_headers(Message(topic=INPUT_TOPIC)) == []


def test_a_record_near_the_size_limit_goes_without_its_value() -> None:
    value = b"v" * 5000
    message = Message(topic=INPUT_TOPIC, partition=1, offset=7, key=b"k", value=value)
    info = failure()
    whole = dlq.dead_letter_record(message, info, topic="dlq", max_record_bytes=1_000_000)
    # Key, value and headers fit in the limit, but not with the room left for framing.
    size = len(value) + 1 + sum(len(k) + len(v) for k, v in whole.headers)
    record = dlq.dead_letter_record(message, info, topic="dlq", max_record_bytes=size + 1000)

    assert (record.key, record.value) == (b"k", b"")
    assert list(record.headers) == [*whole.headers, (dlq.DLQ_VALUE_OMITTED_HEADER, b"5000")]
    assert dlq.parse_dlq_headers(record.headers) == info
    assert dlq.without_value(whole) == record
    assert dlq.without_value(record) == record  # already without: as it is
    roomy = dlq.dead_letter_record(message, info, topic="dlq", max_record_bytes=size + 1024)
    assert roomy == whole
