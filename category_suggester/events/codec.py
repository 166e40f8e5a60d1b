"""The event codec: models of `category_suggester.events.models` to Kafka values and back.

Two framings, told apart by the first bytes:

- Avro single-object encoding (no registry): `C3 01`, the 8-byte little-endian
  CRC-64-AVRO fingerprint of the writer schema's Parsing Canonical Form, the Avro binary
  body. Known writer schemas are the current `.avsc` and every released version under
  `schemas/history/<name>/`, so events written with an older version still decode.
- Confluent wire format (with a `SchemaRegistryClient`): `00`, the 4-byte big-endian
  schema id, the Avro binary body. Written and read with confluent-kafka's
  `AvroSerializer`/`AvroDeserializer`, subject `<topic>-value` (TopicNameStrategy).

Decoding takes the value bytes of a Kafka record and returns a validated model; it raises
only `EventDecodeError` (the bytes are at fault; `reason` is one of `DECODE_REASONS`) or,
with a registry, `RegistryError` (the registry is unwell or refused us, not the event's
fault). Encoding takes a model and returns bytes; it raises `RegistryError` only.

Writer schemas are trusted (our repository or our registry); the bytes are not. Body
reads are bounded by the value size: a length prefix larger than the bytes left fails
with `EventDecodeError` before anything of that size is allocated, and values over
`max_event_bytes` are refused unread.

`codec_from_settings` builds the service's codec (with a registry when one is set).
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any, Final, Generic, TypeVar

import httpx
from confluent_kafka.schema_registry import (
    SchemaRegistryClient,
    prefix_schema_id_deserializer,
)
from confluent_kafka.schema_registry import (
    SchemaRegistryError as ClientRegistryError,
)
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.schema_registry_client import Schema
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.read import SchemaResolutionError
from pydantic import ValidationError

from category_suggester.errors import EventDecodeError, RegistryError
from category_suggester.events.models import (
    CategorySuggestion,
    EventModel,
    ListingImageUploaded,
    SuggestionRecord,
)
from category_suggester.events.schemas import (
    SUGGESTION_SCHEMA,
    UPLOADED_SCHEMA,
    load_schema,
    load_schema_history,
    schema_fingerprint,
)
from category_suggester.settings import Settings

SINGLE_OBJECT_MARKER: Final = b"\xc3\x01"
CONFLUENT_MAGIC: Final = 0x00
DEFAULT_MAX_EVENT_BYTES: Final = 1024 * 1024

# Reasons of EventDecodeError raised here: a small fixed set, used as metric labels.
REASON_UNDECODABLE: Final = "event_undecodable"  # no known framing, truncated, corrupt body
REASON_SCHEMA_UNKNOWN: Final = "schema_unknown"  # unknown fingerprint or schema id
REASON_SCHEMA_INVALID: Final = "schema_invalid"  # decodes, but breaks the schema or contract
REASON_TOO_LARGE: Final = "event_too_large"  # over max_event_bytes, refused unread
DECODE_REASONS: Final = (
    REASON_UNDECODABLE,
    REASON_SCHEMA_UNKNOWN,
    REASON_SCHEMA_INVALID,
    REASON_TOO_LARGE,
)

# Error texts end up in logs and DLQ headers; keep them short whatever the input was.
_MAX_DETAIL = 300

_M = TypeVar("_M", bound=EventModel)


def _detail(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _registry_error(exc: Exception, action: str) -> RegistryError:
    if isinstance(exc, ClientRegistryError):
        status = exc.http_status_code
        retryable = status >= 500 or status in (408, 429)
        return RegistryError(
            f"schema registry {action} failed: {_detail(exc)}",
            reason="registry_unavailable" if retryable else "registry_refused",
            retryable=retryable,
        )
    return RegistryError(f"schema registry {action} failed: {_detail(exc)}", retryable=True)


class _Contract(Generic[_M]):
    """One event type: its model, parsed schemas, framings. Built once; read-only after."""

    def __init__(
        self,
        name: str,
        model: type[_M],
        *,
        topic: str,
        registry: SchemaRegistryClient | None,
        auto_register: bool,
    ) -> None:
        current = load_schema(name)
        self.name = name
        self.model = model
        self.topic = topic
        self.subject = f"{topic}-value"
        self.schema_str = json.dumps(current)
        self.parsed: Any = parse_schema(current)
        self.header = SINGLE_OBJECT_MARKER + schema_fingerprint(current)
        # Writer schemas by fingerprint: the current one and every released version, so
        # producers still on an older version keep working (resolved to the current one).
        self.writers: dict[bytes, Any] = {self.header[2:]: self.parsed}
        for old in load_schema_history(name).values():
            self.writers.setdefault(schema_fingerprint(old), parse_schema(old))
        self.registry = registry
        self.serializer: AvroSerializer | None = None
        self.deserializer: AvroDeserializer | None = None
        if registry is not None:
            self.serializer = AvroSerializer(
                registry,
                self.schema_str,
                conf={
                    "auto.register.schemas": auto_register,
                    "subject.name.strategy.type": "TOPIC",
                },
            )
            self.deserializer = AvroDeserializer(
                registry,
                self.schema_str,
                conf={
                    "subject.name.strategy.type": "TOPIC",
                    "schema.id.deserializer": prefix_schema_id_deserializer,
                },
            )
        self.context = SerializationContext(topic, MessageField.VALUE)
        # Schema ids whose writer schema the registry client holds already.
        self.known_ids: set[int] = set()

    # encode

    def encode(self, event: _M) -> bytes:
        if not isinstance(event, self.model):
            raise TypeError(f"expected {self.model.__name__}, got {type(event).__name__}")
        return self.encode_record(event.model_dump())

    def encode_record(self, record: Mapping[str, Any]) -> bytes:
        """Write a record in the shape of `model_dump()`, unvalidated."""
        if self.serializer is None:
            buffer = io.BytesIO()
            buffer.write(self.header)
            schemaless_writer(buffer, self.parsed, record)
            return buffer.getvalue()
        try:
            data = self.serializer(record, self.context)
        except (ClientRegistryError, httpx.HTTPError) as exc:
            raise _registry_error(exc, f"registration of {self.subject}") from exc
        if data is None:  # only for a None record, which a model never is
            raise TypeError("serializer returned no bytes")
        return bytes(data)

    def prepare(self, auto_register: bool) -> None:
        if self.registry is None:
            return
        schema = Schema(self.schema_str, "AVRO")
        try:
            if auto_register:
                self.registry.register_schema(self.subject, schema)
            else:
                self.registry.lookup_schema(self.subject, schema)
        except (ClientRegistryError, httpx.HTTPError) as exc:
            raise _registry_error(exc, f"registration of {self.subject}") from exc

    # decode

    def decode(self, data: bytes | bytearray | memoryview | None, max_bytes: int) -> _M:
        if data is None:
            raise EventDecodeError(
                f"{self.name}: the record has no value (a tombstone)", reason=REASON_UNDECODABLE
            )
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if size > max_bytes:
            raise EventDecodeError(
                f"{self.name}: value of {size} bytes is over the {max_bytes}-byte limit",
                reason=REASON_TOO_LARGE,
            )
        data = bytes(data)
        if data[:2] == SINGLE_OBJECT_MARKER:
            record = self._read_single_object(data)
        elif data[:1] == bytes((CONFLUENT_MAGIC,)):
            record = self._read_confluent(data)
        else:
            raise EventDecodeError(
                f"{self.name}: no known framing (first bytes {data[:4].hex() or 'none'}); "
                "expected Avro single-object (c301) or Confluent (00)",
                reason=REASON_UNDECODABLE,
            )
        try:
            return self.model.model_validate(record)
        except ValidationError as exc:
            raise EventDecodeError(
                f"{self.name}: breaks the contract: {_detail(exc)}", reason=REASON_SCHEMA_INVALID
            ) from exc

    def _read_single_object(self, data: bytes) -> Any:
        if len(data) < len(self.header):
            raise EventDecodeError(
                f"{self.name}: single-object header truncated ({len(data)} bytes)",
                reason=REASON_UNDECODABLE,
            )
        writer = self.writers.get(data[2:10])
        if writer is None:
            raise EventDecodeError(
                f"{self.name}: unknown schema fingerprint {data[2:10].hex()} "
                f"(known: {', '.join(fp.hex() for fp in self.writers)})",
                reason=REASON_SCHEMA_UNKNOWN,
            )
        buffer = io.BytesIO(data)
        buffer.seek(len(self.header))
        record = self._read_body(
            lambda: schemaless_reader(
                buffer, writer, None if writer is self.parsed else self.parsed
            )
        )
        if buffer.tell() != len(data):
            raise EventDecodeError(
                f"{self.name}: {len(data) - buffer.tell()} trailing bytes after the Avro body",
                reason=REASON_UNDECODABLE,
            )
        return record

    def _read_confluent(self, data: bytes) -> Any:
        if self.registry is None or self.deserializer is None:
            raise EventDecodeError(
                f"{self.name}: Confluent-framed value but no schema registry is configured",
                reason=REASON_SCHEMA_UNKNOWN,
            )
        if len(data) < 6:
            raise EventDecodeError(
                f"{self.name}: Confluent framing truncated ({len(data)} bytes)",
                reason=REASON_UNDECODABLE,
            )
        schema_id = int.from_bytes(data[1:5], "big")
        # Fetch the writer schema first (the client caches it for the deserializer), so a
        # registry fault is told apart from an unknown id and from a bad body.
        try:
            self.registry.get_schema(schema_id)
            self.known_ids.add(schema_id)
        except ClientRegistryError as exc:
            if exc.http_status_code == 404:
                raise EventDecodeError(
                    f"{self.name}: schema id {schema_id} is not in the registry",
                    reason=REASON_SCHEMA_UNKNOWN,
                ) from exc
            raise _registry_error(exc, f"lookup of schema id {schema_id}") from exc
        except httpx.HTTPError as exc:
            raise _registry_error(exc, f"lookup of schema id {schema_id}") from exc
        deserializer = self.deserializer

        def read() -> Any:
            try:
                return deserializer(data, None)
            except (ClientRegistryError, httpx.HTTPError) as exc:
                # Only schema references can still reach the registry here.
                raise _registry_error(exc, f"lookup for schema id {schema_id}") from exc

        return self._read_body(read)

    def _read_body(self, read: Any) -> Any:
        # Classify whatever the Avro reader raises on hostile bytes; nothing else escapes.
        try:
            return read()
        except (EventDecodeError, RegistryError):
            raise
        except SchemaResolutionError as exc:
            raise EventDecodeError(
                f"{self.name}: writer schema does not resolve to ours: {_detail(exc)}",
                reason=REASON_SCHEMA_INVALID,
            ) from exc
        except (EOFError, IndexError, UnicodeDecodeError, SerializationError) as exc:
            # Truncated body, a length prefix past the end, a bad union index or varint,
            # invalid UTF-8.
            raise EventDecodeError(
                f"{self.name}: Avro body is corrupt: {_detail(exc)}", reason=REASON_UNDECODABLE
            ) from exc
        except (ValueError, OverflowError, TypeError) as exc:
            # The body parses but a value breaks its logical type (uuid, timestamp range).
            raise EventDecodeError(
                f"{self.name}: value breaks the schema: {_detail(exc)}",
                reason=REASON_SCHEMA_INVALID,
            ) from exc
        except Exception as exc:
            # Any other failure on untrusted bytes is still the event's fault; the contract
            # is that decoding raises nothing but the errors above.
            raise EventDecodeError(
                f"{self.name}: Avro body is corrupt: {_detail(exc)}", reason=REASON_UNDECODABLE
            ) from exc


class EventCodec:
    """Encodes and decodes the service's events; thread-safe, schemas parsed once.

    Without `registry`: Avro single-object encoding. With one: the Confluent wire format,
    subjects `<input_topic>-value` and `<output_topic>-value`; when `auto_register` is
    true (the default) the serializer registers our schema under the subject on first
    use (the registry's compatibility check still applies); when false the schema must
    already be registered there. The decoder accepts either framing whatever the
    configuration (Confluent framing needs a registry).

    Registry calls are blocking HTTP (cached after the first use of each schema): call
    `prepare()` at start-up and decode off the event loop if a cold lookup may happen.
    """

    def __init__(
        self,
        registry: SchemaRegistryClient | None = None,
        *,
        input_topic: str = "listing-image-uploaded",
        output_topic: str = "category-suggestion",
        auto_register: bool = True,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._max_event_bytes = max_event_bytes
        self._auto_register = auto_register
        self._uploaded = _Contract(
            UPLOADED_SCHEMA,
            ListingImageUploaded,
            topic=input_topic,
            registry=registry,
            auto_register=auto_register,
        )
        self._suggestion = _Contract(
            SUGGESTION_SCHEMA,
            CategorySuggestion,
            topic=output_topic,
            registry=registry,
            auto_register=auto_register,
        )

    @property
    def uses_registry(self) -> bool:
        """Whether encoding writes the Confluent wire format (else single-object)."""
        return self._suggestion.registry is not None

    def prepare(self) -> None:
        """Registers (or, without auto-register, looks up) the output schema now.

        So a registry that refuses our schema or cannot be reached fails the start-up,
        not the first publish. No-op without a registry. Raises `RegistryError`.
        """
        self._suggestion.prepare(self._auto_register)

    def encode_uploaded(self, event: ListingImageUploaded) -> bytes:
        """Kafka value bytes for a listing-image-uploaded event. Raises `RegistryError`."""
        return self._uploaded.encode(event)

    def needs_registry(self, data: bytes | None) -> bool:
        """Whether decoding this listing-image-uploaded value may call the registry (a
        Confluent-framed value whose schema id was not looked up yet): a blocking HTTP
        call, which the service makes off its event loop."""
        contract = self._uploaded
        return (
            contract.registry is not None
            and data is not None
            and len(data) >= 5
            and data[0] == CONFLUENT_MAGIC
            and int.from_bytes(data[1:5], "big") not in contract.known_ids
        )

    def decode_uploaded(self, data: bytes | bytearray | memoryview | None) -> ListingImageUploaded:
        """The event in a listing-image-uploaded value.

        Raises `EventDecodeError` (reason in `DECODE_REASONS`) or `RegistryError`.
        """
        return self._uploaded.decode(data, self._max_event_bytes)

    def encode_suggestion(self, event: CategorySuggestion) -> bytes:
        """Kafka value bytes for a category-suggestion event. Raises `RegistryError`."""
        return self._suggestion.encode(event)

    def encode_suggestion_record(self, record: SuggestionRecord) -> bytes:
        """Kafka value bytes for a suggestion given as a record, written unvalidated.

        The same bytes as `encode_suggestion` of the equivalent model, without its cost
        (see `SuggestionRecord`). Raises `RegistryError`.
        """
        return self._suggestion.encode_record(record)

    def decode_suggestion(self, data: bytes | bytearray | memoryview | None) -> CategorySuggestion:
        """The event in a category-suggestion value.

        Raises `EventDecodeError` (reason in `DECODE_REASONS`) or `RegistryError`.
        """
        return self._suggestion.decode(data, self._max_event_bytes)


def codec_from_settings(settings: Settings) -> EventCodec:
    """The service's codec: Confluent framing with a registry (`settings.registry.url`),
    single-object encoding without; subjects from the input and output topics."""
    registry = None
    if settings.registry.url:
        conf = {"url": settings.registry.url}
        if settings.registry.basic_auth_user_info is not None:
            conf["basic.auth.user.info"] = settings.registry.basic_auth_user_info.get_secret_value()
        registry = SchemaRegistryClient.new_client(conf)
    return EventCodec(
        registry,
        input_topic=settings.kafka.input_topic,
        output_topic=settings.kafka.output_topic,
    )
