"""TritonClassifier against a fake tritonclient: contract checks, labels, retries, stop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from category_suggester.errors import InferenceUnavailableError, ModelContractError
from category_suggester.infer import ModelInfo, TritonClassifier
from category_suggester.logs import JsonFormatter
from category_suggester.metrics import Metrics
from category_suggester.settings import TritonSettings
from tests.support.triton import LABELS, FakeResult, FakeTriton, fake_probabilities, unavailable


def fast_settings(**overrides: Any) -> TritonSettings:
    values: dict[str, Any] = {
        "retry_backoff_base_s": 0.001,
        "retry_backoff_max_s": 0.002,
        "ready_timeout_s": 5.0,
    }
    return TritonSettings(**(values | overrides))


def model_ready(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("suggester_model_ready")


def infer_retries(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("suggester_retries_total", {"stage": "infer"})


async def connected(
    metrics: Metrics, fake: FakeTriton | None = None, **settings: Any
) -> tuple[TritonClassifier, FakeTriton]:
    fake = fake or FakeTriton()
    classifier = TritonClassifier(fast_settings(**settings), metrics, client=fake)
    await classifier.connect()
    return classifier, fake


# --- connect: readiness, contract, labels -------------------------------------------------


async def test_connect_reads_the_model_info_and_labels_from_triton(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    classifier, _ = await connected(metrics)

    assert classifier.info == ModelInfo(
        name="category_classifier",
        version="3",
        image_size=112,
        max_batch_size=32,  # the settings' 32 caps the model's 64
        labels=tuple(LABELS),
        confidence_threshold=0.8125,
    )
    assert model_ready(registry) == 1


async def test_a_model_without_a_recommended_threshold_has_none(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTriton()
    del fake.config["parameters"]["confidence_threshold"]
    with caplog.at_level(logging.WARNING, logger="category_suggester.infer"):
        classifier, _ = await connected(metrics, fake)
    assert classifier.info.confidence_threshold is None
    assert caplog.records == []


@pytest.mark.parametrize(
    "parameter",
    [{"string_value": "high"}, {"string_value": "1.5"}, {"string_value": "nan"}, {}],
    ids=["not a number", "above 1", "NaN", "no string value"],
)
async def test_a_recommended_threshold_that_is_not_a_probability_is_ignored_loudly(
    metrics: Metrics, caplog: pytest.LogCaptureFixture, parameter: dict[str, str]
) -> None:
    fake = FakeTriton()
    fake.config["parameters"]["confidence_threshold"] = parameter
    with caplog.at_level(logging.WARNING, logger="category_suggester.infer"):
        classifier, _ = await connected(metrics, fake)
    assert classifier.info.confidence_threshold is None
    assert classifier.info.labels == tuple(LABELS)  # the service still starts
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    logged = json.loads(JsonFormatter().format(caplog.records[0]))
    assert logged["parameter"] == "confidence_threshold"
    assert logged["model"] == "category_classifier"


async def test_the_ready_model_is_logged_with_its_facts_as_json_fields(
    metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="category_suggester.infer"):
        await connected(metrics)
    [ready] = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    assert ready["msg"] == "model ready"
    assert {k: ready[k] for k in ("model", "version", "image_size", "classes")} == {
        "model": "category_classifier",
        "version": "3",
        "image_size": 112,
        "classes": len(LABELS),
    }
    assert ready["recommended_threshold"] == 0.8125


async def test_connect_reads_the_image_size_and_a_smaller_model_batch(metrics: Metrics) -> None:
    classifier, _ = await connected(metrics, FakeTriton(image_size=224, max_batch_size=8))

    assert classifier.info.image_size == 224
    assert classifier.info.max_batch_size == 8


async def test_connect_waits_until_triton_and_the_model_are_ready(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    fake = FakeTriton()
    fake.not_ready_answers = [unavailable(), unavailable(), True, False, True, True, False]

    classifier, _ = await connected(metrics, fake)

    assert classifier.info.labels == tuple(LABELS)
    assert fake.not_ready_answers == []
    assert model_ready(registry) == 1


async def test_connect_gives_up_at_the_deadline(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    fake = FakeTriton()
    fake.model_ready = False
    classifier = TritonClassifier(fast_settings(), metrics, client=fake)

    with pytest.raises(InferenceUnavailableError, match=r"'category_classifier'.*not ready"):
        await classifier.connect(asyncio.get_running_loop().time() + 0.05)
    assert model_ready(registry) == 0
    assert not await classifier.ready()


def _set_input(fake: FakeTriton, **fields: Any) -> None:
    fake.metadata["inputs"][0].update(fields)


CONTRACT_BREAKS: dict[str, tuple[Callable[[FakeTriton], object], str]] = {
    "input dtype": (
        lambda f: _set_input(f, datatype="FP32"),
        "input 'image' has datatype FP32; expected UINT8",
    ),
    "NCHW dims": (
        lambda f: _set_input(f, shape=["-1", "3", "112", "112"]),
        r"input 'image' has shape \[-1, 3, 112, 112\]; expected NHWC \[-1, S, S, 3\]",
    ),
    "no batch dim": (
        lambda f: _set_input(f, shape=["112", "112", "3"]),
        r"has shape \[112, 112, 3\]; expected NHWC",
    ),
    "variable size": (
        lambda f: _set_input(f, shape=["-1", "-1", "-1", "3"]),
        "with a fixed S",
    ),
    "input name": (
        lambda f: _set_input(f, name="input_1"),
        r"its inputs are \['input_1'\]; expected exactly one input 'image'",
    ),
    "missing output": (
        lambda f: f.metadata.update(outputs=[]),
        r"its outputs are \[\]; expected an output 'probabilities'",
    ),
    "output dtype": (
        lambda f: f.metadata["outputs"][0].update(datatype="FP16"),
        "output 'probabilities' has datatype FP16; expected FP32",
    ),
    "output dims": (
        lambda f: f.metadata["outputs"][0].update(shape=["-1", "5", "1"]),
        r"output 'probabilities' has shape \[-1, 5, 1\]; expected \[-1, C\]",
    ),
    "no batching": (
        lambda f: f.config.update(max_batch_size=0),
        "max_batch_size is 0; it must be > 0",
    ),
    "NCHW format": (
        lambda f: f.config["input"][0].update(format="FORMAT_NCHW"),
        "declared FORMAT_NCHW",
    ),
    "no label file": (
        lambda f: f.config["output"][0].pop("label_filename"),
        "has no label_filename",
    ),
    "a class without a label": (
        lambda f: f.labels.__setitem__(4, None),
        "has no label; labels.txt must name every class",
    ),
    "duplicate labels": (
        lambda f: f.labels.__setitem__(4, "books"),
        "duplicate class names",
    ),
}


@pytest.mark.parametrize("case", CONTRACT_BREAKS, ids=list(CONTRACT_BREAKS))
async def test_connect_fails_at_once_when_the_model_breaks_the_contract(
    metrics: Metrics, case: str
) -> None:
    breaks, message = CONTRACT_BREAKS[case]
    fake = FakeTriton()
    breaks(fake)
    classifier = TritonClassifier(fast_settings(ready_timeout_s=3600), metrics, client=fake)

    # ready_timeout_s is an hour: only failing at once lets this test finish.
    with pytest.raises(ModelContractError, match=message):
        await classifier.connect()


async def test_connect_does_not_wait_on_an_error_that_is_not_an_outage(metrics: Metrics) -> None:
    fake = FakeTriton()
    fake.not_ready_answers = [
        InferenceServerException(msg="unsupported", status="StatusCode.UNIMPLEMENTED")
    ]
    classifier = TritonClassifier(fast_settings(ready_timeout_s=3600), metrics, client=fake)

    with pytest.raises(ModelContractError, match=r"refused the start-up checks.*unsupported"):
        await classifier.connect()


# --- infer ------------------------------------------------------------------------------


def images(batch: int, size: int = 112) -> npt.NDArray[np.uint8]:
    values = np.arange(batch, dtype=np.uint8).reshape(batch, 1, 1, 1) * 40
    return np.broadcast_to(values, (batch, size, size, 3)).copy()


async def test_infer_sends_one_request_and_returns_a_row_per_image(metrics: Metrics) -> None:
    classifier, fake = await connected(metrics)
    batch = images(4)

    probabilities = await classifier.infer(batch)

    assert probabilities.shape == (4, 5)
    assert probabilities.dtype == np.float32
    np.testing.assert_array_equal(probabilities, fake_probabilities(batch, 5))
    np.testing.assert_array_equal(fake.batches[-1], batch)


async def test_infer_retries_an_outage_then_succeeds(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    classifier, fake = await connected(metrics)
    ready_while_failing: list[float | None] = []
    fake.failures = [
        unavailable(),
        InferenceServerException(msg="Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED"),
        ConnectionResetError("connection reset by peer"),
    ]
    real_infer = fake.infer

    async def observing_infer(*args: Any, **kwargs: Any) -> FakeResult:
        ready_while_failing.append(model_ready(registry))
        return await real_infer(*args, **kwargs)

    fake.infer = observing_infer  # type: ignore[method-assign]
    calls_before = fake.infer_calls

    probabilities = await classifier.infer(images(2))

    assert probabilities.shape == (2, 5)
    assert fake.infer_calls - calls_before == 4
    assert infer_retries(registry) == 3
    # Ready before the outage, 0 while it lasted, back to 1 after the success.
    assert ready_while_failing == [1, 0, 0, 0]
    assert model_ready(registry) == 1


@pytest.mark.timeout(10)
async def test_stop_ends_the_retrying_of_an_outage(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    stop = asyncio.Event()
    fake = FakeTriton()
    # A one-hour backoff: the test only finishes if stop interrupts the wait.
    classifier = TritonClassifier(
        fast_settings(retry_backoff_base_s=3600, retry_backoff_max_s=3600),
        metrics,
        client=fake,
        stop=stop,
    )
    await classifier.connect()
    fake.failures = [unavailable() for _ in range(100)]
    fake.infer_called.clear()

    task = asyncio.create_task(classifier.infer(images(1)))
    await fake.infer_called.wait()
    stop.set()

    with pytest.raises(InferenceUnavailableError, match=r"stopping.*failed to connect"):
        await task
    assert fake.infer_calls == 2  # the probe at connect, then one attempt
    assert model_ready(registry) == 0


async def test_once_stopping_an_outage_fails_without_retrying(metrics: Metrics) -> None:
    stop = asyncio.Event()
    fake = FakeTriton()
    classifier = TritonClassifier(fast_settings(), metrics, client=fake, stop=stop)
    await classifier.connect()
    stop.set()

    # While stopping, a healthy Triton still serves the batches being drained...
    assert (await classifier.infer(images(1))).shape == (1, 5)
    # ...but an outage is not retried any more.
    fake.failures = [unavailable()]
    with pytest.raises(InferenceUnavailableError):
        await classifier.infer(images(1))


async def test_a_refused_request_is_a_contract_error_not_retried(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    classifier, fake = await connected(metrics)
    fake.failures = [
        InferenceServerException(
            msg="unexpected shape for input 'image'", status="StatusCode.INVALID_ARGUMENT"
        )
    ]

    with pytest.raises(ModelContractError, match=r"refused a batch of 1.*unexpected shape"):
        await classifier.infer(images(1))
    assert infer_retries(registry) == 0


async def test_a_response_of_the_wrong_shape_is_a_contract_error(metrics: Metrics) -> None:
    classifier, fake = await connected(metrics)
    fake.wrong_output_shape = True

    with pytest.raises(ModelContractError, match=r"\(3, 4\); expected float32 \(3, 5\)"):
        await classifier.infer(images(3))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((1, 112, 112, 3), dtype=np.float32),
        np.zeros((112, 112, 3), dtype=np.uint8),
        np.zeros((1, 224, 224, 3), dtype=np.uint8),
        np.zeros((33, 112, 112, 3), dtype=np.uint8),
        np.zeros((0, 112, 112, 3), dtype=np.uint8),
    ],
    ids=["float32", "no batch dim", "wrong size", "over max batch", "empty"],
)
async def test_infer_refuses_arrays_that_do_not_fit_the_model(
    metrics: Metrics, bad: npt.NDArray[Any]
) -> None:
    classifier, _ = await connected(metrics)

    with pytest.raises(ValueError, match="expected uint8 images"):
        await classifier.infer(bad)


async def test_infer_before_connect_is_a_programming_error(metrics: Metrics) -> None:
    classifier = TritonClassifier(fast_settings(), metrics, client=FakeTriton())

    with pytest.raises(RuntimeError, match="connect"):
        await classifier.infer(images(1))


# --- ready, aclose ----------------------------------------------------------------------


async def test_ready_follows_triton_and_sets_the_gauge(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    fake = FakeTriton()
    classifier = TritonClassifier(fast_settings(), metrics, client=fake)
    assert not await classifier.ready()  # not connected yet

    await classifier.connect()
    assert await classifier.ready()
    assert model_ready(registry) == 1

    fake.not_ready_answers = [unavailable()]
    assert not await classifier.ready()
    assert model_ready(registry) == 0

    fake.model_ready = False
    assert not await classifier.ready()

    fake.model_ready = True
    assert await classifier.ready()
    assert model_ready(registry) == 1


async def test_aclose_closes_the_client(metrics: Metrics) -> None:
    classifier, fake = await connected(metrics)

    await classifier.aclose()

    assert fake.closed
