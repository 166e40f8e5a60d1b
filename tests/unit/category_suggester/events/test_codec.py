"""The event codec (category_suggester/events/codec.py): both framings, interop with a plain
fastavro
producer, hostile bytes."""

from __future__ import annotations

import io
import json
import random
import tracemalloc
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import fastavro
import httpx
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry import SchemaRegistryError as ClientRegistryError
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from category_suggester.errors import EventDecodeError, RegistryError
from category_suggester.events.codec import (
    DECODE_REASONS,
    SINGLE_OBJECT_MARKER,
    EventCodec,
    codec_from_settings,
)
from category_suggester.events.models import ListingImageUploaded, SuggestionRecord
from category_suggester.events.schemas import (
    SUGGESTION_SCHEMA,
    UPLOADED_SCHEMA,
    load_schema,
    schema_fingerprint,
)
from category_suggester.settings import Settings
from tests.support.events import (
    INPUT_TOPIC,
    OUTPUT_TOPIC,
    SCHEMAS,
    rabin64,
    suggestion,
    uploaded,
)


def zigzag(n: int) -> bytes:
    """Avro's zig-zag varint encoding of a long."""
    value = (n << 1) ^ (n >> 63)
    out = bytearray()
    while value & ~0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def avro_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return zigzag(len(raw)) + raw


def body_of(event: ListingImageUploaded) -> bytes:
    """The Avro binary body of `event` (current schema), by hand: the layout under test."""
    return (
        avro_string(str(event.event_id))
        + avro_string(event.listing_id)
        + avro_string(event.image_id)
        + avro_string(event.image_url)
        + zigzag(int(event.uploaded_at.timestamp() * 1000))
        + b"\x02"
        + avro_string(event.seller_id or "")
        + b"\x02"
        + avro_string(event.country or "")
    )


@pytest.fixture
def codec() -> EventCodec:
    return EventCodec()


@pytest.fixture
def registry() -> SchemaRegistryClient:
    # confluent-kafka's in-memory registry: new_client returns it for a mock:// URL.
    return SchemaRegistryClient.new_client({"url": "mock://events"})


@pytest.fixture
def registry_codec(registry: SchemaRegistryClient) -> EventCodec:
    return EventCodec(registry, input_topic=INPUT_TOPIC, output_topic=OUTPUT_TOPIC)


def expect_decode_error(reason: str, call: Callable[[], object]) -> EventDecodeError:
    with pytest.raises(EventDecodeError) as info:
        call()
    assert info.value.reason == reason, info.value.message
    assert info.value.stage == "decode_event"
    return info.value


# ----------------------------------------------------------------- single-object path


def test_single_object_round_trip(codec: EventCodec) -> None:
    event = uploaded()
    data = codec.encode_uploaded(event)
    header = SINGLE_OBJECT_MARKER + schema_fingerprint(load_schema(UPLOADED_SCHEMA))
    assert data == header + body_of(event)
    assert codec.decode_uploaded(data) == event
    assert not codec.uses_registry

    optional_unset = uploaded(seller_id=None, country=None)
    assert codec.decode_uploaded(codec.encode_uploaded(optional_unset)) == optional_unset

    out = suggestion()
    assert codec.decode_suggestion(codec.encode_suggestion(out)) == out


def test_decoding_accepts_bytearray_and_memoryview(codec: EventCodec) -> None:
    data = codec.encode_uploaded(uploaded())
    assert codec.decode_uploaded(bytearray(data)) == uploaded()
    assert codec.decode_uploaded(memoryview(data)) == uploaded()


def test_events_do_not_cross(codec: EventCodec) -> None:
    expect_decode_error(
        "schema_unknown", lambda: codec.decode_suggestion(codec.encode_uploaded(uploaded()))
    )
    with pytest.raises(TypeError):
        codec.encode_suggestion(uploaded())  # type: ignore[arg-type]


def test_plain_fastavro_producer_interoperates(codec: EventCodec) -> None:
    """A producer with only the committed .avsc and fastavro, and back."""
    schema = json.loads((SCHEMAS / "listing_image_uploaded.avsc").read_text())
    canonical = fastavro.schema.to_parsing_canonical_form(schema)
    header = b"\xc3\x01" + rabin64(canonical.encode()).to_bytes(8, "little")
    record: dict[str, Any] = {
        "event_id": "9f1c2b3a-0000-4000-8000-000000000001",
        "listing_id": "l-1",
        "image_id": "i-1",
        "image_url": "s3://bucket/key.jpg",
        "uploaded_at": 1_715_938_215_123,
        "seller_id": None,
        "country": "DE",
    }
    buffer = io.BytesIO()
    buffer.write(header)
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), record)

    event = codec.decode_uploaded(buffer.getvalue())
    assert event.event_id == uuid.UUID(record["event_id"])
    assert event.uploaded_at == datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC)
    assert (event.seller_id, event.country, event.image_url) == (None, "DE", "s3://bucket/key.jpg")

    out_schema = fastavro.parse_schema(
        json.loads((SCHEMAS / "category_suggestion.avsc").read_text())
    )
    data = codec.encode_suggestion(suggestion())
    assert data[:10] == b"\xc3\x01" + rabin64(
        fastavro.schema.to_parsing_canonical_form(out_schema).encode()
    ).to_bytes(8, "little")
    read: Any = fastavro.schemaless_reader(io.BytesIO(data[10:]), out_schema, None)
    assert read["category"] == "furniture"
    assert [s["category"] for s in read["scores"]][:2] == ["furniture", "books"]
    assert read["timings"]["total_ms"] == 40.0
    assert read["produced_at"] == datetime(2024, 5, 17, 9, 30, 15, 163000, tzinfo=UTC)


# ------------------------------------------------------------------------ registry path


def test_registry_round_trip(registry: SchemaRegistryClient, registry_codec: EventCodec) -> None:
    event = uploaded()
    data = registry_codec.encode_uploaded(event)
    registered = registry.get_latest_version(f"{INPUT_TOPIC}-value")
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == registered.schema_id
    assert data[5:] == body_of(event)
    assert registry_codec.decode_uploaded(data) == event
    assert registry_codec.uses_registry

    out = suggestion()
    out_data = registry_codec.encode_suggestion(out)
    assert registry_codec.decode_suggestion(out_data) == out
    assert registry.get_latest_version(f"{OUTPUT_TOPIC}-value").schema_id == int.from_bytes(
        out_data[1:5], "big"
    )


def test_only_a_schema_id_not_yet_looked_up_needs_the_registry(
    registry_codec: EventCodec, codec: EventCodec
) -> None:
    data = registry_codec.encode_uploaded(uploaded())
    assert registry_codec.needs_registry(data)
    registry_codec.decode_uploaded(data)
    assert not registry_codec.needs_registry(data)
    forged = b"\x00" + (4242).to_bytes(4, "big") + data[5:]
    assert registry_codec.needs_registry(forged)  # an unknown id is asked about every time
    single_object = codec.encode_uploaded(uploaded())
    assert not registry_codec.needs_registry(single_object)
    assert not codec.needs_registry(data)  # no registry: nothing to ask
    assert not registry_codec.needs_registry(b"\x00\x01")


def test_registry_codec_still_reads_single_object(registry_codec: EventCodec) -> None:
    data = EventCodec().encode_uploaded(uploaded())
    assert registry_codec.decode_uploaded(data) == uploaded()


def test_confluent_framing_without_registry_is_schema_unknown(
    registry_codec: EventCodec, codec: EventCodec
) -> None:
    data = registry_codec.encode_uploaded(uploaded())
    expect_decode_error("schema_unknown", lambda: codec.decode_uploaded(data))


def test_unknown_schema_id_is_schema_unknown(registry_codec: EventCodec) -> None:
    data = registry_codec.encode_uploaded(uploaded())
    forged = b"\x00" + (4242).to_bytes(4, "big") + data[5:]
    error = expect_decode_error("schema_unknown", lambda: registry_codec.decode_uploaded(forged))
    assert "4242" in error.message


def test_registry_reads_an_older_writer_schema(
    registry: SchemaRegistryClient, registry_codec: EventCodec
) -> None:
    """A producer on a version without the optional fields: they decode to their defaults."""
    older = load_schema(UPLOADED_SCHEMA)
    older["fields"] = [f for f in older["fields"] if f["name"] not in ("seller_id", "country")]
    serializer = AvroSerializer(
        registry, json.dumps(older), conf={"subject.name.strategy.type": "TOPIC"}
    )
    record = uploaded().model_dump(exclude={"seller_id", "country"})
    data = serializer(record, SerializationContext("legacy-topic", MessageField.VALUE))
    assert data is not None
    assert registry_codec.decode_uploaded(data) == uploaded(seller_id=None, country=None)


def test_registry_writer_of_another_record_is_schema_invalid(
    registry: SchemaRegistryClient, registry_codec: EventCodec
) -> None:
    other = {"type": "record", "name": "Other", "fields": [{"name": "x", "type": "string"}]}
    schema_id = registry.register_schema("other-value", Schema(json.dumps(other), "AVRO"))
    data = b"\x00" + schema_id.to_bytes(4, "big") + avro_string("x")
    expect_decode_error("schema_invalid", lambda: registry_codec.decode_uploaded(data))


@pytest.mark.parametrize(
    ("failure", "reason", "retryable"),
    [
        (ClientRegistryError(503, 50301, "unavailable"), "registry_unavailable", True),
        (ClientRegistryError(401, 40101, "unauthorized"), "registry_refused", False),
        (httpx.ConnectError("connection refused"), "registry_unavailable", True),
    ],
)
def test_registry_faults_are_infrastructure_not_bad_input(
    registry: SchemaRegistryClient,
    monkeypatch: pytest.MonkeyPatch,
    failure: Exception,
    reason: str,
    retryable: bool,
) -> None:
    data = EventCodec(registry).encode_uploaded(uploaded())

    def refuse(*args: object, **kwargs: object) -> None:
        raise failure

    fresh = SchemaRegistryClient.new_client({"url": "mock://faulty"})
    monkeypatch.setattr(fresh, "get_schema", refuse)
    monkeypatch.setattr(fresh, "register_schema_full_response", refuse)
    monkeypatch.setattr(fresh, "register_schema", refuse)
    faulty = EventCodec(fresh)
    for call in (
        lambda: faulty.decode_uploaded(data),
        lambda: faulty.encode_suggestion(suggestion()),
        faulty.prepare,
    ):
        with pytest.raises(RegistryError) as info:
            call()
        assert (info.value.reason, info.value.retryable) == (reason, retryable)


def test_prepare_registers_or_looks_up(registry: SchemaRegistryClient) -> None:
    with pytest.raises(RegistryError) as info:
        EventCodec(registry, auto_register=False).prepare()
    assert not info.value.retryable
    EventCodec(registry).prepare()
    assert registry.get_latest_version(f"{OUTPUT_TOPIC}-value").version == 1
    EventCodec(registry, auto_register=False).prepare()
    EventCodec().prepare()


def test_auto_register_off_needs_a_registered_schema(registry: SchemaRegistryClient) -> None:
    strict = EventCodec(registry, auto_register=False)
    with pytest.raises(RegistryError):
        strict.encode_suggestion(suggestion())
    EventCodec(registry).prepare()
    assert strict.decode_suggestion(strict.encode_suggestion(suggestion())) == suggestion()


# ------------------------------------------------------------------------ hostile bytes

HEADER = SINGLE_OBJECT_MARKER + schema_fingerprint(load_schema(UPLOADED_SCHEMA))
UUID_TEXT = "0b7f5d2c-4a57-4c1e-9a43-2f7f1d1d9e01"
PREFIX = HEADER + avro_string(UUID_TEXT)  # event_id, then listing_id comes next


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "event_undecodable"),
        (b"", "event_undecodable"),
        (b"{}", "event_undecodable"),
        (b"\xc3", "event_undecodable"),
        (b"\xc3\x01\x00", "event_undecodable"),
        (b"\xc3\x01" + b"\x01" * 8 + b"body", "schema_unknown"),
        (b"\x00\x00\x00", "schema_unknown"),  # Confluent framing, no registry configured
        (HEADER, "event_undecodable"),
        (PREFIX + zigzag(2**62) + b"abc", "event_undecodable"),  # huge length prefix
        (PREFIX + zigzag(-5) + b"abc", "event_undecodable"),  # negative length
        (PREFIX + b"\xff" * 20, "event_undecodable"),  # varint that never ends
        (PREFIX + avro_string(b"\xff\xfe") + b"\x00" * 12, "event_undecodable"),  # not UTF-8
        (HEADER + avro_string("not-a-uuid") + b"\x00" * 12, "schema_invalid"),
    ],
)
def test_hostile_values_raise_event_decode_error(
    codec: EventCodec, data: bytes | None, reason: str
) -> None:
    expect_decode_error(reason, lambda: codec.decode_uploaded(data))


def test_bad_union_index_and_timestamp_overflow(codec: EventCodec) -> None:
    strings = PREFIX + avro_string("l") + avro_string("i") + avro_string("u")
    bad_union = strings + zigzag(0) + zigzag(4) + b"\x00"  # seller_id's union has 2 branches
    expect_decode_error("event_undecodable", lambda: codec.decode_uploaded(bad_union))
    overflow = strings + zigzag(2**62) + b"\x00\x00"  # far past year 9999
    expect_decode_error("schema_invalid", lambda: codec.decode_uploaded(overflow))
    assert codec.decode_uploaded(strings + zigzag(0) + b"\x00\x00").seller_id is None


def test_every_truncation_is_refused(codec: EventCodec) -> None:
    for data in (codec.encode_uploaded(uploaded()), codec.encode_suggestion(suggestion())):
        decode = codec.decode_uploaded if data[2:10] == HEADER[2:] else codec.decode_suggestion
        for end in range(len(data)):
            with pytest.raises(EventDecodeError):
                decode(data[:end])


def test_every_truncation_is_refused_on_the_registry_path(registry_codec: EventCodec) -> None:
    data = registry_codec.encode_uploaded(uploaded())
    for end in range(len(data)):
        with pytest.raises(EventDecodeError):
            registry_codec.decode_uploaded(data[:end])


def test_random_registry_bodies_only_ever_raise_event_decode_error(
    registry_codec: EventCodec,
) -> None:
    rng = random.Random(7)
    valid = registry_codec.encode_uploaded(uploaded())
    reasons: set[str] = set()
    for _ in range(1000):
        mutable = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            mutable[rng.randrange(1, len(mutable))] = rng.randrange(256)
        try:
            registry_codec.decode_uploaded(bytes(mutable))
        except EventDecodeError as error:
            reasons.add(error.reason)
    assert reasons <= set(DECODE_REASONS)


def test_trailing_bytes_are_refused(codec: EventCodec) -> None:
    data = codec.encode_uploaded(uploaded()) + b"\x00"
    expect_decode_error("event_undecodable", lambda: codec.decode_uploaded(data))


def test_huge_length_prefixes_allocate_nothing_large(codec: EventCodec) -> None:
    hostile = [
        PREFIX + zigzag(2**62) + b"x" * 100,
        PREFIX + zigzag(2**31) + b"x" * 100,
        SINGLE_OBJECT_MARKER
        + schema_fingerprint(load_schema(SUGGESTION_SCHEMA))
        + b"".join(avro_string(UUID_TEXT) for _ in range(2))
        + avro_string("l") * 3
        + b"\x00" * 8
        + zigzag(2**62),  # an array block count of 2**62
    ]
    tracemalloc.start()
    try:
        for data in hostile:
            with pytest.raises(EventDecodeError):
                codec.decode_uploaded(data) if data.startswith(HEADER) else codec.decode_suggestion(
                    data
                )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_values_over_the_size_cap_are_refused_unread() -> None:
    small = EventCodec(max_event_bytes=64)
    data = EventCodec().encode_uploaded(uploaded())
    assert len(data) > 64
    expect_decode_error("event_too_large", lambda: small.decode_uploaded(data))
    expect_decode_error("event_too_large", lambda: small.decode_uploaded(memoryview(data)))
    with pytest.raises(ValueError, match="positive"):
        EventCodec(max_event_bytes=0)


def test_decoded_suggestion_must_keep_the_contract(codec: EventCodec) -> None:
    schema = fastavro.parse_schema(load_schema(SUGGESTION_SCHEMA))
    record = suggestion().model_dump()
    record["scores"] = list(reversed(record["scores"]))  # no longer sorted
    buffer = io.BytesIO()
    buffer.write(b"\xc3\x01" + schema_fingerprint(load_schema("category_suggestion")))
    fastavro.schemaless_writer(buffer, schema, record)
    expect_decode_error("schema_invalid", lambda: codec.decode_suggestion(buffer.getvalue()))


def test_random_bodies_only_ever_raise_event_decode_error(codec: EventCodec) -> None:
    rng = random.Random(20240517)
    valid = codec.encode_uploaded(uploaded())
    reasons: set[str] = set()
    for _ in range(3000):
        if rng.random() < 0.5:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 80)))
            data = HEADER + body
        else:  # flip a few bytes of a valid value, header included
            mutable = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                mutable[rng.randrange(len(mutable))] = rng.randrange(256)
            data = bytes(mutable)
        try:
            codec.decode_uploaded(data)
        except EventDecodeError as error:
            reasons.add(error.reason)
    assert reasons <= set(DECODE_REASONS)
    assert len(reasons) >= 3


@pytest.mark.parametrize("which", ["codec", "registry_codec"])
def test_a_suggestion_record_encodes_to_the_same_bytes_as_its_model(
    which: str, request: pytest.FixtureRequest
) -> None:
    # The service's hot path writes plain records; they must be the model's bytes exactly.
    codec: EventCodec = request.getfixturevalue(which)
    model = suggestion()
    record = cast(SuggestionRecord, model.model_dump())
    assert codec.encode_suggestion_record(record) == codec.encode_suggestion(model)
    assert codec.decode_suggestion(codec.encode_suggestion_record(record)) == model


def test_codec_from_settings_frames_with_the_registry_only_when_one_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plain = codec_from_settings(Settings())
    assert not plain.uses_registry
    assert plain.encode_suggestion(suggestion())[:2] == SINGLE_OBJECT_MARKER

    made: list[tuple[dict[str, str], SchemaRegistryClient]] = []
    in_memory = SchemaRegistryClient.new_client

    def new_client(conf: dict[str, str]) -> SchemaRegistryClient:
        client = in_memory({"url": "mock://settings"})
        made.append((conf, client))
        return client

    monkeypatch.setattr(SchemaRegistryClient, "new_client", staticmethod(new_client))
    settings = Settings(
        kafka={"input_topic": "uploads", "output_topic": "answers"},
        registry={"url": "https://registry.example:8081", "basic_auth_user_info": "user:secret"},
    )
    codec = codec_from_settings(settings)
    codec.prepare()

    ((conf, client),) = made
    assert conf == {"url": "https://registry.example:8081", "basic.auth.user.info": "user:secret"}
    assert client.get_subjects() == ["answers-value"]  # subject of the output topic
    assert codec.encode_suggestion(suggestion())[:1] == b"\x00"
