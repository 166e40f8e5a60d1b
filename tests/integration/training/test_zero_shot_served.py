"""The zero-shot cold-start model, served by the real tritonserver as `make stack` serves it.

The session's Triton (tests/conftest.py) serves what `bootstrap` builds when no trained
model exists. Real photos of each category (training/photos) come back as their category,
marked confident at the threshold the model's config carries, which the consumer reads;
real photos of none of the categories stay below it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from category_suggester.infer import TritonClassifier
from category_suggester.metrics import Metrics
from category_suggester.settings import TritonSettings
from devstack.triton import TritonServer
from tests.conftest import ServedModel
from training.data import serving_image
from training.repository import MODEL_NAME
from training.zero_shot import PHOTOS

pytestmark = pytest.mark.integration

PER_CATEGORY = 4


def _photos(folder: str, count: int) -> list[Path]:
    found = sorted((PHOTOS / folder).glob("*.jpg"))[:count]
    assert len(found) == count, f"{PHOTOS / folder} holds fewer than {count} photos"
    return found


def _served_probabilities(server: TritonServer, paths: list[Path], size: int) -> np.ndarray:
    images = np.stack([serving_image(path, size).permute(1, 2, 0).numpy() for path in paths])
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(
            MODEL_NAME, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")]
        )
    finally:
        client.close()
    probabilities: np.ndarray = result.as_numpy("probabilities")
    return probabilities


def test_real_photos_get_their_category_from_the_served_zero_shot_model(
    triton: TritonServer, served_model: ServedModel
) -> None:
    categories = sorted(
        p.name for p in PHOTOS.iterdir() if p.is_dir() and p.name in served_model.labels
    )
    assert len(categories) >= 4
    paths = [path for category in categories for path in _photos(category, PER_CATEGORY)]
    probabilities = _served_probabilities(triton, paths, served_model.image_size)

    assert served_model.image_size == 224
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = [served_model.labels[i] for i in probabilities.argmax(axis=1)]
    assert predicted == [path.parent.name for path in paths]
    confident = probabilities.max(axis=1) >= served_model.confidence_threshold
    assert confident.mean() >= 0.5, probabilities


def test_photos_of_no_category_are_not_confident(
    triton: TritonServer, served_model: ServedModel
) -> None:
    paths = _photos("out_of_category", 24)
    probabilities = _served_probabilities(triton, paths, served_model.image_size)
    top = probabilities.max(axis=1)
    # The unmapped ImageNet mass is spread evenly: no category stands out.
    assert (top < served_model.confidence_threshold).mean() >= 0.9, top
    assert float(np.median(top)) < 1.5 / len(served_model.labels)


async def test_the_consumer_reads_the_zero_shot_threshold_and_description(
    triton: TritonServer, served_model: ServedModel
) -> None:
    classifier = TritonClassifier(TritonSettings(url=triton.grpc_url), Metrics(CollectorRegistry()))
    try:
        info = await classifier.connect()
    finally:
        await classifier.aclose()
    assert info.confidence_threshold == served_model.confidence_threshold
    assert info.image_size == 224
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    finally:
        client.close()
    description = config["parameters"]["model_description"]["string_value"]
    assert "zero-shot" in description
    assert "ImageNet" in description
