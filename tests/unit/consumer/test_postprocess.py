from __future__ import annotations

import numpy as np
import pytest

from consumer.errors import ModelContractError
from consumer.postprocess import CategoryScore, Prediction, postprocess

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
