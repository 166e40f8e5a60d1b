"""TritonClassifier and Batcher against the real tritonserver serving a random-init model."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry

from category_suggester.batch import Batcher
from category_suggester.infer import ModelInfo, TritonClassifier
from category_suggester.metrics import Metrics
from category_suggester.settings import TritonSettings
from devstack.process import free_port
from devstack.triton import TritonServer

if TYPE_CHECKING:
    from tests.conftest import ServedModel

pytestmark = pytest.mark.integration


def random_images(count: int, size: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def onnxruntime_probabilities(
    onnx_path: Path, images: npt.NDArray[np.uint8]
) -> npt.NDArray[np.float32]:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(["probabilities"], {"image": images})
    result: npt.NDArray[np.float32] = probabilities
    return result


async def test_connect_reads_the_served_model_and_its_labels(
    triton: TritonServer, served_model: ServedModel
) -> None:
    registry = CollectorRegistry()
    settings = TritonSettings(url=triton.grpc_url, max_batch_size=16)
    classifier = TritonClassifier(settings, Metrics(registry))
    try:
        info = await classifier.connect()
        assert await classifier.ready()
    finally:
        await classifier.aclose()

    assert info == ModelInfo(
        name="category_classifier",
        version=str(served_model.version),
        image_size=served_model.image_size,
        max_batch_size=16,
        labels=tuple(served_model.labels),
        confidence_threshold=served_model.confidence_threshold,
    )
    assert registry.get_sample_value("suggester_model_ready") == 1


async def test_batched_results_match_onnxruntime(
    triton: TritonServer, served_model: ServedModel
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    settings = TritonSettings(
        url=triton.grpc_url, max_batch_size=16, max_batch_wait_ms=20, max_inflight_batches=2
    )
    images = random_images(64, served_model.image_size, seed=1)
    classifier = TritonClassifier(settings, metrics)
    info = await classifier.connect()
    batcher = Batcher(classifier, info, settings, metrics)
    try:
        results = await asyncio.gather(*(batcher.submit(image) for image in images))
    finally:
        await batcher.aclose()
        await classifier.aclose()

    got = np.stack([r.probabilities for r in results])
    expected = onnxruntime_probabilities(served_model.onnx_path, images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    batches = registry.get_sample_value("suggester_batch_size_count")
    assert batches is not None
    assert batches < 64
    assert max(r.batch_size for r in results) > 1


@pytest.mark.timeout(240)
async def test_infer_retries_through_a_triton_restart(
    served_model: ServedModel, tmp_path: Path
) -> None:
    # A server of its own: stopping the session's server would break the other tests.
    server = TritonServer(
        served_model.repository,
        tmp_path / "triton",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        poll_secs=None,
    )
    await asyncio.to_thread(server.start)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    settings = TritonSettings(
        url=server.grpc_url,
        max_batch_size=8,
        retry_backoff_base_s=0.05,
        retry_backoff_max_s=0.5,
    )
    images = random_images(16, served_model.image_size, seed=2)
    classifier = TritonClassifier(settings, metrics)
    batcher: Batcher | None = None
    try:
        info = await classifier.connect()
        batcher = Batcher(classifier, info, settings, metrics)
        submit = batcher.submit
        before = await asyncio.gather(*(submit(image) for image in images))

        # Some batches are in flight or queued when Triton gets SIGTERM, the rest are
        # submitted while it is down; starting it again takes seconds, which they spend
        # retrying.
        during: list[asyncio.Task[Any]] = [
            asyncio.create_task(submit(image)) for image in images[:8]
        ]
        await asyncio.to_thread(server.stop)
        assert not await classifier.ready()
        during += [asyncio.create_task(submit(image)) for image in images[8:]]
        await asyncio.to_thread(server.start)
        after = await asyncio.gather(*during)

        np.testing.assert_allclose(
            np.stack([r.probabilities for r in after]),
            np.stack([r.probabilities for r in before]),
            rtol=0,
            atol=1e-5,
        )
        retries = registry.get_sample_value("suggester_retries_total", {"stage": "infer"})
        assert retries is not None
        assert retries > 0
        assert registry.get_sample_value("suggester_model_ready") == 1
        assert await classifier.ready()
    finally:
        if batcher is not None:
            await batcher.aclose()
        await classifier.aclose()
        await asyncio.to_thread(server.stop)
