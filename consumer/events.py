"""Event contracts: the Avro schemas in `consumer/schemas/`, their models and their codec.

The schemas are the contract; the pydantic models mirror them field for field
(`ListingImageUploaded`, `CategorySuggestion` with `CategoryScore` and `StageTimings`, and
`DlqInfo` for the dead-letter headers). Timestamps are aware UTC datetimes truncated to
milliseconds, like `timestamp-millis` on the wire, so a model survives a round trip equal.

`EventCodec` turns models into Kafka values and back. Two framings, told apart by the
first bytes:

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
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Annotated, Any, Final, Generic, TypedDict, TypeVar
from uuid import UUID

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
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from consumer.errors import EventDecodeError, RegistryError, SuggesterError

NAMESPACE: Final = "com.marketplace.categorysuggester"

# Schema names: `<name>.avsc` in consumer/schemas, history in schemas/history/<name>/v<N>.avsc.
UPLOADED_SCHEMA: Final = "listing_image_uploaded"
SUGGESTION_SCHEMA: Final = "category_suggestion"
DLQ_HEADERS_SCHEMA: Final = "dlq_headers"

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
REASON_DLQ_HEADERS_INVALID: Final = "dlq_headers_invalid"  # parse_dlq_headers only

# Dead-letter headers (documented in schemas/dlq_headers.avsc); values are UTF-8 strings.
DLQ_HEADER_PREFIX: Final = "dlq."
DLQ_ERROR_CLASS: Final = "dlq.error.class"
DLQ_STAGE: Final = "dlq.stage"
DLQ_REASON: Final = "dlq.reason"
DLQ_MESSAGE: Final = "dlq.message"
DLQ_ORIGINAL_TOPIC: Final = "dlq.original.topic"
DLQ_ORIGINAL_PARTITION: Final = "dlq.original.partition"
DLQ_ORIGINAL_OFFSET: Final = "dlq.original.offset"
DLQ_ATTEMPTS: Final = "dlq.attempts"
DLQ_FAILED_AT: Final = "dlq.failed.at"
DLQ_SERVICE_VERSION: Final = "dlq.service.version"
DLQ_MESSAGE_MAX_BYTES: Final = 1024

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_SCHEMA_NAME = re.compile(r"[a-z][a-z0-9_]*")
_HISTORY_FILE = re.compile(r"v([1-9][0-9]*)\.avsc")
_DECIMAL = re.compile(r"-?[0-9]{1,19}")
# Error texts end up in logs and DLQ headers; keep them short whatever the input was.
_MAX_DETAIL = 300


# --------------------------------------------------------------------------- models


def utc_millis(value: datetime) -> datetime:
    """`value` in UTC, truncated to milliseconds (what `timestamp-millis` keeps)."""
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


UtcMillis = Annotated[AwareDatetime, AfterValidator(utc_millis)]
"""An aware datetime, converted to UTC and truncated to milliseconds (`timestamp-millis`)."""

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Millis = Annotated[float, Field(allow_inf_nan=False)]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# Ids travel on as Kafka keys and values of the suggestion; one of a megabyte breaks the
# contract instead (no real id is near this long).
MAX_ID_LENGTH: Final = 256
Id = Annotated[str, Field(max_length=MAX_ID_LENGTH)]


class ListingImageUploaded(_Record):
    """`listing_image_uploaded.avsc`: a seller uploaded an image (key: listing_id).

    Validation is Avro's plus a length bound on ids (`MAX_ID_LENGTH` characters):
    `image_url` is any string here; the fetch step applies the URL policy.
    """

    event_id: UUID
    listing_id: Id
    image_id: Id
    image_url: str
    uploaded_at: UtcMillis
    seller_id: Id | None = None
    country: Id | None = None


class CategoryScore(_Record):
    """One category and the model's probability for it."""

    category: str
    score: Probability


class StageTimings(_Record):
    """Per-stage latency of one event, in milliseconds (see the schema's field docs)."""

    fetch_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    preprocess_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    inference_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    # Measured across machines from uploaded_at: clock skew can make it negative.
    total_ms: Millis


class CategorySuggestion(_Record):
    """`category_suggestion.avsc`: the suggestion for one image (key: listing_id).

    Beyond Avro's types this model holds the contract the schema docs state, so a
    suggestion that breaks it can be neither produced nor accepted: probabilities in
    [0, 1]; `scores` not empty, distinct, sorted highest first; `category`/`score` equal
    to `scores[0]`; `confident` equal to `score >= confidence_threshold`.
    """

    event_id: UUID
    source_event_id: UUID
    listing_id: str
    image_id: str
    category: str
    score: Probability
    scores: tuple[CategoryScore, ...] = Field(min_length=1)
    confident: bool
    confidence_threshold: Probability
    model_name: str
    model_version: str
    timings: StageTimings
    produced_at: UtcMillis

    @model_validator(mode="after")
    def _consistent(self) -> CategorySuggestion:
        top = self.scores[0]
        if (self.category, self.score) != (top.category, top.score):
            raise ValueError("category and score must equal scores[0]")
        if any(a.score < b.score for a, b in zip(self.scores, self.scores[1:], strict=False)):
            raise ValueError("scores must be sorted by score, highest first")
        if len({s.category for s in self.scores}) != len(self.scores):
            raise ValueError("scores must name each category once")
        if self.confident != (self.score >= self.confidence_threshold):
            raise ValueError("confident must equal score >= confidence_threshold")
        return self


class ScoreRecord(TypedDict):
    category: str
    score: float


class TimingsRecord(TypedDict):
    fetch_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float


class SuggestionRecord(TypedDict):
    """A suggestion as the Avro writer takes it: the shape of `CategorySuggestion.model_dump()`.

    For the service's hot path, where validating a suggestion cost more than building it:
    `EventCodec.encode_suggestion_record` writes it without the model's checks, so build
    one only from values that keep the contract (see `CategorySuggestion`).
    """

    event_id: UUID
    source_event_id: UUID
    listing_id: str
    image_id: str
    category: str
    score: float
    scores: list[ScoreRecord]
    confident: bool
    confidence_threshold: float
    model_name: str
    model_version: str
    timings: TimingsRecord
    produced_at: datetime


class DlqInfo(_Record):
    """Why and whence a dead-lettered record: the values of its `dlq.*` headers.

    `message` is truncated to `DLQ_MESSAGE_MAX_BYTES` UTF-8 bytes on validation.
    """

    error_class: str
    stage: str
    reason: str
    message: str
    original_topic: str
    original_partition: int = Field(ge=0, le=2**31 - 1)
    original_offset: int = Field(ge=0, le=2**63 - 1)
    attempts: int = Field(ge=1, le=2**31 - 1)
    failed_at: UtcMillis
    service_version: str

    @model_validator(mode="before")
    @classmethod
    def _truncate_message(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("message"), str):
            data = {**data, "message": _truncate_utf8(data["message"], DLQ_MESSAGE_MAX_BYTES)}
        return data

    @classmethod
    def for_error(
        cls,
        error: BaseException,
        *,
        topic: str,
        partition: int,
        offset: int,
        attempts: int,
        service_version: str,
        failed_at: datetime | None = None,
    ) -> DlqInfo:
        """The headers' values for `error`, raised while processing topic/partition/offset.

        Stage and reason come from a `SuggesterError`; any other exception (a bug that
        the caller chose to dead-letter) gets stage `unknown` and reason `error`.
        """
        stage = error.stage if isinstance(error, SuggesterError) else "unknown"
        reason = error.reason if isinstance(error, SuggesterError) else "error"
        return cls(
            error_class=type(error).__name__,
            stage=stage,
            reason=reason,
            message=str(error),
            original_topic=topic,
            original_partition=partition,
            original_offset=offset,
            attempts=attempts,
            failed_at=failed_at if failed_at is not None else datetime.now(UTC),
            service_version=service_version,
        )


def _truncate_utf8(text: str, max_bytes: int) -> str:
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) <= max_bytes:
        return text
    # Cut on a character boundary: drop a partial trailing sequence.
    return encoded[:max_bytes].decode("utf-8", errors="ignore")


def _to_millis(value: datetime) -> int:
    return (value - _EPOCH) // _ONE_MS


# ----------------------------------------------------------------------- DLQ headers

_DLQ_FIELDS: Final = (
    ("error_class", DLQ_ERROR_CLASS),
    ("stage", DLQ_STAGE),
    ("reason", DLQ_REASON),
    ("message", DLQ_MESSAGE),
    ("original_topic", DLQ_ORIGINAL_TOPIC),
    ("original_partition", DLQ_ORIGINAL_PARTITION),
    ("original_offset", DLQ_ORIGINAL_OFFSET),
    ("attempts", DLQ_ATTEMPTS),
    ("failed_at", DLQ_FAILED_AT),
    ("service_version", DLQ_SERVICE_VERSION),
)
_DLQ_INT_FIELDS: Final = frozenset({"original_partition", "original_offset", "attempts"})


def dlq_headers(info: DlqInfo) -> list[tuple[str, bytes]]:
    """The `dlq.*` headers for a dead-letter record, values as UTF-8 strings.

    Integers are decimal; `failed_at` is decimal milliseconds since the Unix epoch.
    The DLQ record itself keeps the original key and value bytes unchanged.
    """
    out: list[tuple[str, bytes]] = []
    for field, header in _DLQ_FIELDS:
        value = getattr(info, field)
        text = str(_to_millis(value)) if isinstance(value, datetime) else str(value)
        out.append((header, text.encode("utf-8")))
    return out


def parse_dlq_headers(
    headers: Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None,
) -> DlqInfo:
    """The `DlqInfo` of a dead-letter record, from its headers (`Message.headers()`).

    Other headers are ignored; when a `dlq.*` header repeats, the last one wins (the most
    recent failure). Raises `EventDecodeError(reason="dlq_headers_invalid")` when a
    header is missing, is not UTF-8 or does not parse.
    """
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    found: dict[str, bytes | str | None] = {}
    for name, value in items:
        if name.startswith(DLQ_HEADER_PREFIX):
            found[name] = value
    values: dict[str, Any] = {}
    try:
        for field, header in _DLQ_FIELDS:
            raw = found.get(header)
            if raw is None:
                raise ValueError(f"header {header} is missing")
            text = raw if isinstance(raw, str) else raw.decode("utf-8")
            if field in _DLQ_INT_FIELDS or field == "failed_at":
                if not _DECIMAL.fullmatch(text):
                    raise ValueError(f"header {header} is not a decimal integer: {text[:40]!r}")
                number = int(text)
                values[field] = _EPOCH + number * _ONE_MS if field == "failed_at" else number
            else:
                values[field] = text
        return DlqInfo(**values)
    except (ValueError, OverflowError) as exc:  # ValidationError and UnicodeError are ValueErrors
        raise EventDecodeError(
            f"dead-letter headers do not parse: {_detail(exc)}", reason=REASON_DLQ_HEADERS_INVALID
        ) from exc


def without_dlq_headers(
    headers: Iterable[tuple[str, bytes | None]] | None,
) -> list[tuple[str, bytes | None]]:
    """`headers` less every `dlq.*` one: what a replayed record carries back to the input."""
    return [(k, v) for k, v in (headers or ()) if not k.startswith(DLQ_HEADER_PREFIX)]


# -------------------------------------------------------------------------- schemas


def _schemas_dir() -> resources.abc.Traversable:
    return resources.files("consumer") / "schemas"


def _checked_name(name: str) -> str:
    if not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"not a schema name: {name!r}")
    return name


def load_schema(name: str) -> dict[str, Any]:
    """The current schema `<name>.avsc` from the package, as parsed JSON (a fresh copy).

    Raises `FileNotFoundError` for an unknown name, `ValueError` for a malformed one.
    """
    text = (_schemas_dir() / f"{_checked_name(name)}.avsc").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def load_schema_history(name: str) -> dict[int, dict[str, Any]]:
    """Released versions of schema `name`, `{version: schema}` from `history/<name>/v<N>.avsc`.

    Empty when the package carries no history for `name`.
    """
    folder = _schemas_dir() / "history" / _checked_name(name)
    if not folder.is_dir():
        return {}
    versions: dict[int, dict[str, Any]] = {}
    for entry in folder.iterdir():
        match = _HISTORY_FILE.fullmatch(entry.name)
        if match:
            versions[int(match.group(1))] = json.loads(entry.read_text(encoding="utf-8"))
    return dict(sorted(versions.items()))


def schema_fingerprint(schema: Mapping[str, Any] | str) -> bytes:
    """CRC-64-AVRO (Rabin) fingerprint of the schema's Parsing Canonical Form.

    `schema` is a parsed `.avsc` (a mapping) or schema JSON text (e.g. `'"int"'`).

    Returned as the 8 little-endian bytes that follow `C3 01` in single-object encoding.
    """
    parsed = json.loads(schema) if isinstance(schema, str) else dict(schema)
    # fastavro renders the 64-bit value as hex of its little-endian bytes.
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


# ---------------------------------------------------------------------------- codec

_M = TypeVar("_M", bound=_Record)


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
