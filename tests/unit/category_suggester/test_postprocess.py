from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from category_suggester.errors import ModelContractError
from category_suggester.events.codec import EventCodec
from category_suggester.events.models import CategorySuggestion, SuggestionRecord
from category_suggester.postprocess import CategoryScore, Prediction, postprocess, suggestion_record
from tests.support.events import uploaded

LABELS = ("books", "car", "furniture", "mobile", "motorcycle")


def test_ranks_every_class_and_picks_the_top() -> None:
    row = np.array([0.1, 0.6, 0.05, 0.2, 0.05], dtype=np.float32)

    prediction = postprocess(row, LABELS, threshold=0.5)

    assert isinstance(prediction, Prediction)
    assert (prediction.category, prediction.confident) == ("car", True)
    assert prediction.score == pytest.approx(0.6)
    assert [s.category for s in prediction.scores] == [
        "car",
        "mobile",
        "books",
        "furniture",
        "motorcycle",
    ]
    assert [s.score for s in prediction.scores] == pytest.approx([0.6, 0.2, 0.1, 0.05, 0.05])
    assert all(type(s) is CategoryScore and type(s.score) is float for s in prediction.scores)


def test_below_the_threshold_is_still_a_prediction_marked_not_confident() -> None:
    row = np.array([0.3, 0.25, 0.2, 0.15, 0.1], dtype=np.float32)

    prediction = postprocess(row, LABELS, threshold=0.5)

    assert prediction.category == "books"
    assert not prediction.confident


def test_a_score_equal_to_the_threshold_is_confident() -> None:
    row = np.array([0.5, 0.5, 0.0, 0.0, 0.0], dtype=np.float64)

    prediction = postprocess(row, LABELS, threshold=0.5)

    assert prediction.confident
    # Equal scores keep the model's class order.
    assert [s.category for s in prediction.scores] == list(LABELS)


def test_a_class_count_other_than_the_labels_is_refused() -> None:
    with pytest.raises(ModelContractError, match="4 class scores but has 5 labels"):
        postprocess(np.full(4, 0.25, dtype=np.float32), LABELS, threshold=0.5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1.0001, -0.0001])
def test_scores_outside_the_unit_interval_are_refused(bad: float) -> None:
    row = np.array([0.2, bad, 0.2, 0.2, 0.2], dtype=np.float32)

    with pytest.raises(ModelContractError, match=r"outside \[0, 1\]"):
        postprocess(row, LABELS, threshold=0.5)


def test_a_batch_instead_of_one_row_is_refused() -> None:
    with pytest.raises(ModelContractError, match=r"shape \(C,\)"):
        postprocess(np.full((1, 5), 0.2, dtype=np.float32), LABELS, threshold=0.5)


EVENT = uploaded()
SECONDS = {"fetch_s": 0.012, "preprocess_s": 0.003, "inference_s": 0.02}


def record_after(row: list[float], delay: timedelta) -> SuggestionRecord:
    """The suggestion record of EVENT for probabilities `row`, made `delay` after its upload."""
    prediction = postprocess(np.array(row), LABELS, threshold=0.5)
    model = {"model_name": "category_classifier", "model_version": "3"}
    return suggestion_record(
        EVENT, prediction, threshold=0.5, now=EVENT.uploaded_at + delay, **model, **SECONDS
    )


def test_suggestion_record_is_a_valid_suggestion_of_the_event() -> None:
    record = record_after([0.1, 0.6, 0.05, 0.2, 0.05], timedelta(seconds=2, microseconds=345678))

    model = CategorySuggestion.model_validate(record)  # keeps the contract
    assert (model.source_event_id, model.listing_id, model.image_id) == (
        EVENT.event_id,
        EVENT.listing_id,
        EVENT.image_id,
    )
    assert model.event_id != EVENT.event_id
    assert (model.category, model.confident, model.confidence_threshold) == ("car", True, 0.5)
    assert [s.category for s in model.scores] == [
        "car",
        "mobile",
        "books",
        "furniture",
        "motorcycle",
    ]
    assert (model.model_name, model.model_version) == ("category_classifier", "3")
    assert model.produced_at == datetime(2024, 5, 17, 9, 30, 17, 468000, tzinfo=UTC)
    assert model.timings.model_dump() == pytest.approx(
        {"fetch_ms": 12.0, "preprocess_ms": 3.0, "inference_ms": 20.0, "total_ms": 2345.0}
    )
    codec = EventCodec()  # written unvalidated, the record is the model's bytes
    assert codec.encode_suggestion_record(record) == codec.encode_suggestion(model)


def test_suggestion_record_ids_are_fresh_and_skewed_clocks_give_zero_total() -> None:
    # This clock is behind the uploader's.
    first, second = (record_after([0.3, 0.25, 0.2, 0.15, 0.1], timedelta(seconds=-5)) for _ in "ab")
    assert first["event_id"] != second["event_id"]
    assert first["timings"]["total_ms"] == 0.0
    assert not first["confident"]
    assert CategorySuggestion.model_validate(first).category == "books"
