"""Event contracts: the Avro schemas in `category_suggester/schemas/`, their models and their codec.

- `models`: pydantic models mirroring the schemas field for field, and the plain
  `SuggestionRecord` the service writes on its hot path;
- `codec`: `EventCodec`, models to Kafka values and back (Avro single-object encoding or
  the Confluent wire format), and `codec_from_settings`;
- `dlq`: the dead-letter records' `dlq.*` headers, `DlqInfo`, and the record builder;
- `schemas`: loading the `.avsc` files and their fingerprints.

The names below are re-exported for `from category_suggester.events import X`; each module is the
home of its names and says what it raises.
"""

from category_suggester.events.codec import (
    CONFLUENT_MAGIC,
    DECODE_REASONS,
    DEFAULT_MAX_EVENT_BYTES,
    REASON_SCHEMA_INVALID,
    REASON_SCHEMA_UNKNOWN,
    REASON_TOO_LARGE,
    REASON_UNDECODABLE,
    SINGLE_OBJECT_MARKER,
    EventCodec,
    codec_from_settings,
)
from category_suggester.events.dlq import (
    DLQ_ATTEMPTS,
    DLQ_ERROR_CLASS,
    DLQ_FAILED_AT,
    DLQ_HEADER_PREFIX,
    DLQ_MESSAGE,
    DLQ_MESSAGE_MAX_BYTES,
    DLQ_ORIGINAL_OFFSET,
    DLQ_ORIGINAL_PARTITION,
    DLQ_ORIGINAL_TOPIC,
    DLQ_REASON,
    DLQ_SERVICE_VERSION,
    DLQ_STAGE,
    DLQ_VALUE_OMITTED_HEADER,
    REASON_DLQ_HEADERS_INVALID,
    DlqInfo,
    dead_letter_record,
    dlq_headers,
    original_headers,
    parse_dlq_headers,
    without_dlq_headers,
    without_value,
)
from category_suggester.events.models import (
    MAX_ID_LENGTH,
    CategoryScore,
    CategorySuggestion,
    EventModel,
    ListingImageUploaded,
    ScoreRecord,
    StageTimings,
    SuggestionRecord,
    TimingsRecord,
    utc_millis,
)
from category_suggester.events.schemas import (
    DLQ_HEADERS_SCHEMA,
    NAMESPACE,
    SUGGESTION_SCHEMA,
    UPLOADED_SCHEMA,
    load_schema,
    load_schema_history,
    schema_fingerprint,
)

__all__ = [
    "CONFLUENT_MAGIC",
    "DECODE_REASONS",
    "DEFAULT_MAX_EVENT_BYTES",
    "DLQ_ATTEMPTS",
    "DLQ_ERROR_CLASS",
    "DLQ_FAILED_AT",
    "DLQ_HEADERS_SCHEMA",
    "DLQ_HEADER_PREFIX",
    "DLQ_MESSAGE",
    "DLQ_MESSAGE_MAX_BYTES",
    "DLQ_ORIGINAL_OFFSET",
    "DLQ_ORIGINAL_PARTITION",
    "DLQ_ORIGINAL_TOPIC",
    "DLQ_REASON",
    "DLQ_SERVICE_VERSION",
    "DLQ_STAGE",
    "DLQ_VALUE_OMITTED_HEADER",
    "MAX_ID_LENGTH",
    "NAMESPACE",
    "REASON_DLQ_HEADERS_INVALID",
    "REASON_SCHEMA_INVALID",
    "REASON_SCHEMA_UNKNOWN",
    "REASON_TOO_LARGE",
    "REASON_UNDECODABLE",
    "SINGLE_OBJECT_MARKER",
    "SUGGESTION_SCHEMA",
    "UPLOADED_SCHEMA",
    "CategoryScore",
    "CategorySuggestion",
    "DlqInfo",
    "EventCodec",
    "EventModel",
    "ListingImageUploaded",
    "ScoreRecord",
    "StageTimings",
    "SuggestionRecord",
    "TimingsRecord",
    "codec_from_settings",
    "dead_letter_record",
    "dlq_headers",
    "load_schema",
    "load_schema_history",
    "original_headers",
    "parse_dlq_headers",
    "schema_fingerprint",
    "utc_millis",
    "without_dlq_headers",
    "without_value",
]
