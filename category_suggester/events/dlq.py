"""Dead-letter records: their `dlq.*` headers, `DlqInfo`, and the record builder.

A DLQ record keeps the original key and value bytes unchanged and carries the original
headers (less any `dlq.*` ones from an earlier trip) plus the `dlq.*` headers that say why
it failed and whence it came, documented in `category_suggester/schemas/dlq_headers.avsc`; their
values are UTF-8 strings. A record whose original value would make it larger than the
producer's record limit goes without the value, and `dlq.value.omitted` holds the value's
size in bytes.

`dead_letter_record` builds the record for a consumed message; `parse_dlq_headers` reads
the headers back (raising `EventDecodeError(reason="dlq_headers_invalid")`), and
`original_headers` gives what a replayed record carries back to the input topic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from confluent_kafka import Message
from pydantic import Field, model_validator

from category_suggester.errors import EventDecodeError, SuggesterError
from category_suggester.events.models import EventModel, UtcMillis
from category_suggester.publish import OutputRecord

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
# On a DLQ record sent without its (too large) original value: the value's size in bytes.
DLQ_VALUE_OMITTED_HEADER: Final = "dlq.value.omitted"

REASON_DLQ_HEADERS_INVALID: Final = "dlq_headers_invalid"

# Room left for a record's framing when checking its size against max_record_bytes.
RECORD_OVERHEAD_BYTES: Final = 1024

# Headers as confluent-kafka hands them over (`Message.headers()`) or a caller builds them.
RawHeaders = Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS: Final = timedelta(milliseconds=1)
_DECIMAL = re.compile(r"-?[0-9]{1,19}")
# Error texts end up in logs; keep them short whatever the headers held.
_MAX_DETAIL = 300


class DlqInfo(EventModel):
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


def _items(headers: RawHeaders) -> Iterable[tuple[str, bytes | str | None]]:
    """Header pairs of either form confluent-kafka uses: a list of pairs or a dict."""
    return headers.items() if isinstance(headers, Mapping) else (headers or ())


def dlq_headers(info: DlqInfo) -> list[tuple[str, bytes]]:
    """The `dlq.*` headers for a dead-letter record, values as UTF-8 strings.

    Integers are decimal; `failed_at` is decimal milliseconds since the Unix epoch.
    """
    out: list[tuple[str, bytes]] = []
    for field, header in _DLQ_FIELDS:
        value = getattr(info, field)
        text = str(_to_millis(value)) if isinstance(value, datetime) else str(value)
        out.append((header, text.encode("utf-8")))
    return out


def parse_dlq_headers(headers: RawHeaders) -> DlqInfo:
    """The `DlqInfo` of a dead-letter record, from its headers (`Message.headers()`).

    Other headers are ignored; when a `dlq.*` header repeats, the last one wins (the most
    recent failure). Raises `EventDecodeError(reason="dlq_headers_invalid")` when a
    header is missing, is not UTF-8 or does not parse.
    """
    found: dict[str, bytes | str | None] = {}
    for name, value in _items(headers):
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
        detail = f"{type(exc).__name__}: {exc}"
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 3] + "..."
        raise EventDecodeError(
            f"dead-letter headers do not parse: {detail}", reason=REASON_DLQ_HEADERS_INVALID
        ) from exc


def without_dlq_headers(
    headers: Iterable[tuple[str, bytes | None]] | None,
) -> list[tuple[str, bytes | None]]:
    """`headers` less every `dlq.*` one: what a replayed record carries back to the input."""
    return [(k, v) for k, v in (headers or ()) if not k.startswith(DLQ_HEADER_PREFIX)]


def original_headers(message: Message) -> list[tuple[str, bytes]]:
    """The message's headers as a list of byte values, less any `dlq.*` ones from an
    earlier trip and any without a value."""
    as_bytes = [(k, v.encode() if isinstance(v, str) else v) for k, v in _items(message.headers())]
    return [(k, v) for k, v in without_dlq_headers(as_bytes) if v is not None]


def dead_letter_record(
    message: Message, info: DlqInfo, *, topic: str, max_record_bytes: int
) -> OutputRecord:
    """The DLQ record for `message`, failed as `info` says, for the DLQ `topic`.

    Its key and value are the message's; its headers the message's original ones plus
    `dlq_headers(info)`. When that would come near `max_record_bytes` (the producer's
    limit), the record goes without the value (`without_value`).
    """
    headers = original_headers(message) + dlq_headers(info)
    key = message.key()
    value = message.value() or b""
    size = len(value) + len(key or b"") + sum(len(k) + len(v) for k, v in headers)
    record = OutputRecord(topic, key, value, headers)
    if size + RECORD_OVERHEAD_BYTES > max_record_bytes:
        return without_value(record)
    return record


def without_value(record: OutputRecord) -> OutputRecord:
    """`record` with an empty value and `dlq.value.omitted` set to the value's size: for a
    DLQ record too large to carry its original value (the producer or the broker said so).
    A record already without its value is returned as it is."""
    if any(name == DLQ_VALUE_OMITTED_HEADER for name, _ in record.headers):
        return record
    omitted = (DLQ_VALUE_OMITTED_HEADER, str(len(record.value)).encode())
    return OutputRecord(record.topic, record.key, b"", [*record.headers, omitted])
