"""Hostile `listing-image-uploaded` values, each with the outcome the service must give it.

`event_cases(image_url)` returns `EventCase`s whose only fault is the event itself: where
an event decodes, its image is the good one at `image_url`. Bodies are written by hand or
with a loosened copy of our schema (no logical types), so any value can be put on the wire
behind our schema's fingerprint.

The oversized cases (`oversized_event_cases`) are kept apart: they are about what the
broker and the service's producer accept, not about decoding.
"""

from __future__ import annotations

import copy
import io
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastavro import parse_schema, schemaless_writer

from category_suggester.events import (
    SINGLE_OBJECT_MARKER,
    UPLOADED_SCHEMA,
    EventCodec,
    load_schema,
    schema_fingerprint,
)
from tests.corpus import SUGGESTED
from tests.support.kafka import make_suggestion

CODEC = EventCodec()
HEADER = SINGLE_OBJECT_MARKER + schema_fingerprint(load_schema(UPLOADED_SCHEMA))


@dataclass(frozen=True)
class EventCase:
    name: str  # also the Kafka key
    value: bytes | None  # None: a tombstone
    expect: str  # SUGGESTED or the DLQ reason
    listing_id: str | None = None  # set when the event decodes: what the suggestion carries


def _loose_schema() -> Any:
    schema = copy.deepcopy(load_schema(UPLOADED_SCHEMA))
    for field in schema["fields"]:
        if isinstance(field["type"], dict):
            field["type"] = field["type"]["type"]
    return parse_schema(schema)


_LOOSE = _loose_schema()


def record(image_url: str, **fields: Any) -> dict[str, Any]:
    """A wire record (plain strings and longs) with fresh ids; `fields` override."""
    values: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "listing_id": f"listing-{uuid.uuid4().hex[:10]}",
        "image_id": f"image-{uuid.uuid4().hex[:10]}",
        "image_url": image_url,
        "uploaded_at": int(datetime.now(UTC).timestamp() * 1000),
        "seller_id": None,
        "country": None,
    }
    values.update(fields)
    return values


def body(values: Mapping[str, Any]) -> bytes:
    """The Avro binary body of `values` under our schema, logical types loosened."""
    out = io.BytesIO()
    schemaless_writer(out, _LOOSE, dict(values))
    return out.getvalue()


def framed(values: Mapping[str, Any]) -> bytes:
    return HEADER + body(values)


def varint(n: int) -> bytes:
    """Avro's zig-zag varint encoding of a long."""
    value = (n << 1) ^ (n >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def avro_string(raw: bytes) -> bytes:
    return varint(len(raw)) + raw


def _suggestion_value() -> bytes:
    return CODEC.encode_suggestion(make_suggestion())


def event_cases(image_url: str) -> list[EventCase]:
    """Hostile event values; decodable ones point at the good image `image_url`."""
    good = record(image_url)
    good_body = body(good)
    event_id = avro_string(good["event_id"].encode())
    odd_ids = "\x00\u202e<script>'; DROP TABLE--\U0001f600\r\n"
    cases = [
        EventCase("not-avro", b"not avro at all", "event_undecodable"),
        EventCase("empty", b"", "event_undecodable"),
        EventCase("tombstone", None, "event_undecodable"),
        EventCase("json", json.dumps(good).encode(), "event_undecodable"),
        EventCase("avro-unframed", good_body, "event_undecodable"),
        EventCase("marker-only", SINGLE_OBJECT_MARKER, "event_undecodable"),
        EventCase("header-truncated", HEADER[:5], "event_undecodable"),
        EventCase("header-only", HEADER, "event_undecodable"),
        EventCase("body-truncated", HEADER + good_body[: len(good_body) // 2], "event_undecodable"),
        EventCase(
            "missing-fields",
            HEADER + event_id + avro_string(b"listing") + avro_string(b"image"),
            "event_undecodable",
        ),
        EventCase("trailing-bytes", framed(good) + b"\x00\x00", "event_undecodable"),
        EventCase(
            "negative-length",
            HEADER + event_id + varint(-5) + good_body[len(event_id) :],
            "event_undecodable",
        ),
        EventCase("length-past-end", HEADER + varint(2**40) + b"x" * 64, "event_undecodable"),
        EventCase("varint-endless", HEADER + b"\xff" * 64, "event_undecodable"),
        EventCase("union-index-7", _with_union_branch(good_body, 7), "event_undecodable"),
        EventCase(
            "invalid-utf8",
            HEADER + event_id + avro_string(b"\xff\xfe\xc3\x28") + good_body[len(event_id) :],
            "event_undecodable",
        ),
        # Another schema: a suggestion on the input topic; an unknown fingerprint; the
        # Confluent framing with a schema id while the service runs without a registry.
        EventCase("wrong-schema", _suggestion_value(), "schema_unknown"),
        EventCase(
            "unknown-fingerprint",
            SINGLE_OBJECT_MARKER + b"\x01\x02\x03\x04\x05\x06\x07\x08" + good_body,
            "schema_unknown",
        ),
        EventCase(
            "confluent-id", b"\x00" + (12345).to_bytes(4, "big") + good_body, "schema_unknown"
        ),
        # Right shape on the wire, wrong values for the contract.
        EventCase(
            "event-id-not-uuid", framed(record(image_url, event_id="not-a-uuid")), "schema_invalid"
        ),
        EventCase(
            "uploaded-at-overflow", framed(record(image_url, uploaded_at=2**62)), "schema_invalid"
        ),
        EventCase(
            "uploaded-at-underflow",
            framed(record(image_url, uploaded_at=-(2**62))),
            "schema_invalid",
        ),
        EventCase(
            "listing-id-257", framed(record(image_url, listing_id="L" * 257)), "schema_invalid"
        ),
    ]
    # Decodable events with odd but legal values: classified, the values kept unchanged.
    odd: dict[str, dict[str, Any]] = {
        "odd-ids": {
            "listing_id": f"listing{odd_ids}",
            "image_id": odd_ids,
            "seller_id": odd_ids,
            "country": "\U0001f3f4",
        },
        "empty-ids": {"listing_id": "", "image_id": ""},
        "listing-id-256": {"listing_id": "L" * 256},
        "uploaded-year-1": {"uploaded_at": -62135596800000},
        "uploaded-year-9999": {"uploaded_at": 253402300799000},
    }
    for name, fields in odd.items():
        values = record(image_url, **fields)
        cases.append(EventCase(name, framed(values), SUGGESTED, values["listing_id"]))
    return cases


def _with_union_branch(good_body: bytes, branch: int) -> bytes:
    """`good_body` (seller_id and country null) with seller_id's union branch replaced."""
    # The two null unions are the last two bytes (branch 0 each).
    assert good_body[-2:] == b"\x00\x00"
    return HEADER + good_body[:-2] + varint(branch) + b"\x00"


def oversized_event_cases(image_url: str, *, max_event_bytes: int) -> list[EventCase]:
    """Strings of about 1 MB: under the service's event limit, and over it."""
    under = max_event_bytes - 4096
    return [
        EventCase("url-1mb", framed(record(image_url + "?" + "a" * under)), "url_invalid"),
        EventCase(
            "listing-id-1mb", framed(record(image_url, listing_id="L" * under)), "schema_invalid"
        ),
        EventCase(
            "event-over-limit",
            framed(record(image_url, image_id="i" * max_event_bytes)),
            "event_too_large",
        ),
    ]
