"""Postprocess: one image's class probabilities into a category suggestion.

`postprocess` takes the probability row the model returned for one image (shape `(C,)`),
the model's C class names in output order and the confidence threshold; returns a
`Prediction` with every class and its score sorted by score descending (ties keep the
model's class order), the top category and score, and `confident = score >= threshold`.
Pure: no I/O, no state.

Raises `ModelContractError` when the row does not fit the contract (not one dimension, a
length other than the number of labels, or a value outside [0, 1], NaN included): the
served model is at fault, not the event. So a `Prediction` always makes a suggestion that
keeps the schema's contract (the service builds it without validating it again).

`suggestion_record` then makes the `category-suggestion` record of one event from its
`Prediction`, the model's name and version, the threshold and the stage timings: a plain
`SuggestionRecord` for `EventCodec.encode_suggestion_record`, built without pydantic's
checks (on the hot path they cost more than the rest of the step). Every field keeps the
contract by construction: the ids come from a validated event, the scores from
`postprocess`, `confident` from the same threshold. It adds a fresh event id and the
time, and raises nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from category_suggester.errors import ModelContractError
from category_suggester.events.models import ListingImageUploaded, SuggestionRecord, utc_millis


@dataclass(frozen=True, slots=True)
class CategoryScore:
    category: str
    score: float


@dataclass(frozen=True, slots=True)
class Prediction:
    """The suggestion for one image.

    `scores` holds every class, highest score first; `category` and `score` are its first
    entry; `confident` says whether `score` reached the threshold.
    """

    category: str
    score: float
    confident: bool
    scores: tuple[CategoryScore, ...]


def postprocess(
    probabilities: npt.NDArray[np.floating[Any]], labels: Sequence[str], threshold: float
) -> Prediction:
    """Rank the classes of one probability row; see the module docstring for the contract."""
    if probabilities.ndim != 1:
        raise ModelContractError(
            f"expected one image's probabilities of shape (C,), got shape {probabilities.shape}"
        )
    if probabilities.shape[0] != len(labels):
        raise ModelContractError(
            f"the model returned {probabilities.shape[0]} class scores but has {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ModelContractError("the model has no classes")
    # Plain Python beats numpy's per-call overhead on a row of a handful of classes.
    values = probabilities.tolist()
    if not all(0.0 <= v <= 1.0 for v in values):  # NaN fails every comparison
        raise ModelContractError(f"the model returned scores outside [0, 1]: {values}")
    # sorted() is stable: equal scores keep the model's class order, so the same row always
    # yields the same ranking.
    order = sorted(range(len(values)), key=values.__getitem__, reverse=True)
    scores = tuple(CategoryScore(labels[i], values[i]) for i in order)
    top = scores[0]
    return Prediction(
        category=top.category,
        score=top.score,
        confident=top.score >= threshold,
        scores=scores,
    )


def suggestion_record(
    event: ListingImageUploaded,
    prediction: Prediction,
    *,
    threshold: float,
    model_name: str,
    model_version: str,
    fetch_s: float,
    preprocess_s: float,
    inference_s: float,
    now: datetime | None = None,
) -> SuggestionRecord:
    """The suggestion for `event`: `prediction` (made with `threshold`) by the model
    `model_name` at `model_version`, with the stages' seconds (inference: queueing and
    the call), produced `now` (default: the current time, to the millisecond).

    `total_ms` runs from the event's `uploaded_at` to `now`, at least 0.
    """
    produced_at = utc_millis(now if now is not None else datetime.now(UTC))
    total_s = max(0.0, (produced_at - event.uploaded_at).total_seconds())
    return {
        "event_id": uuid.uuid4(),
        "source_event_id": event.event_id,
        "listing_id": event.listing_id,
        "image_id": event.image_id,
        "category": prediction.category,
        "score": prediction.score,
        "scores": [{"category": s.category, "score": s.score} for s in prediction.scores],
        "confident": prediction.confident,
        "confidence_threshold": threshold,
        "model_name": model_name,
        "model_version": model_version,
        "timings": {
            "fetch_ms": fetch_s * 1000,
            "preprocess_ms": preprocess_s * 1000,
            "inference_ms": inference_s * 1000,
            "total_ms": total_s * 1000,
        },
        "produced_at": produced_at,
    }
