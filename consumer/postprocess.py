"""Postprocess: one image's class probabilities into a category suggestion.

Takes the probability row the model returned for one image (shape `(C,)`), the model's C
class names in output order and the confidence threshold; returns a `Prediction` with every
class and its score sorted by score descending (ties keep the model's class order), the top
category and score, and `confident = score >= threshold`. Pure: no I/O, no state.

Raises `ModelContractError` when the row does not fit the contract (not one dimension, a
length other than the number of labels, or a value outside [0, 1], NaN included): the
served model is at fault, not the event. So a `Prediction` always makes a suggestion that
keeps the schema's contract (the service builds it without validating it again).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from consumer.errors import ModelContractError


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
