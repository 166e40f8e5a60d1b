"""The event models: pydantic mirrors of the Avro schemas in `category_suggester/schemas/`.

`ListingImageUploaded` (the input), `CategorySuggestion` with `CategoryScore` and
`StageTimings` (the output), field for field as their `.avsc`; `DlqInfo`, the dead-letter
headers' model, lives with the headers in `category_suggester.events.dlq`. Timestamps are aware UTC
datetimes truncated to milliseconds, like `timestamp-millis` on the wire, so a model
survives a round trip equal. Validation raises pydantic's `ValidationError`.

`SuggestionRecord` (with `ScoreRecord` and `TimingsRecord`) is the suggestion as the Avro
writer takes it, a plain dict: what the service builds on its hot path, where validating
a model cost more than building the record (`category_suggester.postprocess.suggestion_record`).
Its keys and value types are the model's; a unit test holds the two shapes equal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, TypedDict
from uuid import UUID

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator


def utc_millis(value: datetime) -> datetime:
    """`value` in UTC, truncated to milliseconds (what `timestamp-millis` keeps)."""
    value = value.astimezone(UTC)
    return value.replace(microsecond=value.microsecond - value.microsecond % 1000)


UtcMillis = Annotated[AwareDatetime, AfterValidator(utc_millis)]
"""An aware datetime, converted to UTC and truncated to milliseconds (`timestamp-millis`)."""

Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Millis = Annotated[float, Field(allow_inf_nan=False)]


class EventModel(BaseModel):
    """Base of the contract models: frozen, and no field beyond the schema's."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# Ids travel on as Kafka keys and values of the suggestion; one of a megabyte breaks the
# contract instead (no real id is near this long).
MAX_ID_LENGTH: Final = 256
Id = Annotated[str, Field(max_length=MAX_ID_LENGTH)]


class ListingImageUploaded(EventModel):
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


class CategoryScore(EventModel):
    """One category and the model's probability for it."""

    category: str
    score: Probability


class StageTimings(EventModel):
    """Per-stage latency of one event, in milliseconds (see the schema's field docs)."""

    fetch_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    preprocess_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    inference_ms: Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
    # Measured across machines from uploaded_at: clock skew can make it negative.
    total_ms: Millis


class CategorySuggestion(EventModel):
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


# The record twins of the suggestion's models, field for field (a unit test checks it):
# a TypedDict is what mypy checks a plain dict against, and the model itself is no cheap
# stand-in: built without validation (`model_construct`) and dumped for the writer, it
# costs about five times the dict.


class ScoreRecord(TypedDict):
    """`CategoryScore` as a record."""

    category: str
    score: float


class TimingsRecord(TypedDict):
    """`StageTimings` as a record."""

    fetch_ms: float
    preprocess_ms: float
    inference_ms: float
    total_ms: float


class SuggestionRecord(TypedDict):
    """A suggestion as the Avro writer takes it: the shape of `CategorySuggestion.model_dump()`.

    `EventCodec.encode_suggestion_record` writes it without the model's checks, so build
    one only from values that keep the contract (`category_suggester.postprocess.suggestion_record`
    does).
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
