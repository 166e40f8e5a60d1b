"""The event models (category_suggester/events/models.py): they mirror the schemas and keep the
contract."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any, get_args, get_origin, get_type_hints

import pytest
from pydantic import AwareDatetime, ValidationError

from category_suggester.events import dlq, models, schemas
from category_suggester.events.models import CategorySuggestion, ListingImageUploaded, StageTimings
from tests.support.events import suggestion, uploaded


def _all_fields(schema: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(schema, dict):
        for field in schema.get("fields", []):
            found.append(field)
            found.extend(_all_fields(field["type"]))
        found.extend(_all_fields(schema.get("items")))
    elif isinstance(schema, list):
        for branch in schema:
            found.extend(_all_fields(branch))
    return found


@pytest.mark.parametrize(
    ("name", "model"),
    [
        (schemas.UPLOADED_SCHEMA, ListingImageUploaded),
        (schemas.SUGGESTION_SCHEMA, CategorySuggestion),
        (schemas.DLQ_HEADERS_SCHEMA, dlq.DlqInfo),
    ],
)
def test_models_mirror_the_schemas(name: str, model: type[Any]) -> None:
    schema = schemas.load_schema(name)
    assert schema["doc"]
    assert [f["name"] for f in schema["fields"]] == list(model.model_fields)
    for field in _all_fields(schema):
        assert field.get("doc"), f"{name}.{field['name']} has no doc"
        optional = isinstance(field["type"], list) and "null" in field["type"]
        if optional:
            assert "default" in field
            assert not model.model_fields[field["name"]].is_required()


def test_timestamps_become_utc_milliseconds() -> None:
    plus_two = timezone(timedelta(hours=2))
    event = uploaded(uploaded_at=datetime(2024, 5, 17, 11, 30, 15, 123999, tzinfo=plus_two))
    assert event.uploaded_at == datetime(2024, 5, 17, 9, 30, 15, 123000, tzinfo=UTC)
    assert event.uploaded_at.tzinfo is UTC


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError):
        uploaded(uploaded_at=datetime(2024, 5, 17, 9, 30))


def test_models_are_frozen_and_closed() -> None:
    event = uploaded()
    with pytest.raises(ValidationError):
        event.listing_id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        uploaded(unexpected="x")
    with pytest.raises(ValidationError):
        uploaded(event_id="not-a-uuid")


def test_image_url_is_any_string_here() -> None:
    assert uploaded(image_url="gopher://whatever").image_url == "gopher://whatever"


@pytest.mark.parametrize(
    "changes",
    [
        {"category": "books"},
        {"score": 0.5},
        {"scores": [{"category": "furniture", "score": 0.91}, {"category": "b", "score": 0.95}]},
        {
            "scores": [
                {"category": "furniture", "score": 0.91},
                {"category": "furniture", "score": 0},
            ]
        },
        {"scores": []},
        {"confident": False},
        {"confidence_threshold": 0.95},
        {"score": 1.5, "scores": [{"category": "furniture", "score": 1.5}]},
        {"score": float("nan"), "scores": [{"category": "furniture", "score": float("nan")}]},
        {"timings": {"fetch_ms": -1, "preprocess_ms": 0, "inference_ms": 0, "total_ms": 0}},
        {
            "timings": {
                "fetch_ms": 1,
                "preprocess_ms": 0,
                "inference_ms": float("inf"),
                "total_ms": 0,
            }
        },
    ],
)
def test_suggestion_contract_is_enforced(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        suggestion(**changes)


def test_suggestion_below_threshold_is_valid_and_not_confident() -> None:
    low = suggestion(
        score=0.4,
        scores=[{"category": "furniture", "score": 0.4}, {"category": "books", "score": 0.4}],
        confident=False,
    )
    assert not low.confident
    assert suggestion(
        timings=StageTimings(fetch_ms=0, preprocess_ms=0, inference_ms=0, total_ms=-3)
    )


# The TypedDict twin of each model, and how a model's field type reads in the twin.
TWINS: dict[type[Any], Any] = {
    CategorySuggestion: models.SuggestionRecord,
    StageTimings: models.TimingsRecord,
    models.CategoryScore: models.ScoreRecord,
}


def _record_type(annotation: Any) -> Any:
    if annotation in TWINS:
        return TWINS[annotation]
    if get_origin(annotation) is tuple:
        item, _ellipsis = get_args(annotation)
        return list[TWINS[item]]  # type: ignore[index]
    if annotation is AwareDatetime:
        return datetime
    return annotation


@pytest.mark.parametrize(("model", "record"), list(TWINS.items()))
def test_each_record_twins_its_model(model: type[Any], record: Any) -> None:
    # The hot path writes records unvalidated: a field added to a model and not to its
    # record (or typed otherwise) fails here, not on the wire.
    hints = get_type_hints(record)
    assert list(hints) == list(model.model_fields)
    assert hints == {name: _record_type(f.annotation) for name, f in model.model_fields.items()}
