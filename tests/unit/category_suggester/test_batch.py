"""Batcher against a fake inferer: batching by size and time, the in-flight cap, failures,
cancellation and draining. No test waits on wall-clock time except the batch timer itself."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from prometheus_client import CollectorRegistry

from category_suggester.batch import Batcher, BatchResult
from category_suggester.errors import InferenceUnavailableError, ModelContractError
from category_suggester.infer import ModelInfo
from category_suggester.metrics import Metrics
from category_suggester.settings import TritonSettings

SIZE = 8  # small images: the batcher does not care about the model's real size
LONG_WAIT_MS = 3_600_000.0  # an hour: a test using it only ends if batches go out by size


class FakeInferer:
    """Returns row i = [id, 2*id] where id is image i's pixel value; can be held at a gate."""

    def __init__(self) -> None:
        self.batches: list[npt.NDArray[np.uint8]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failure: BaseException | None = None
        self.inflight = 0
        self.max_inflight = 0
        self.entered = asyncio.Condition()

    async def infer(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        assert images.dtype == np.uint8
        assert images.flags.c_contiguous
        self.batches.append(images.copy())
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        async with self.entered:
            self.entered.notify_all()
        try:
            await self.gate.wait()
            if self.failure is not None:
                raise self.failure
            ids = images[:, 0, 0, 0].astype(np.float32)
            return np.stack([ids, 2 * ids], axis=1)
        finally:
            self.inflight -= 1

    async def wait_for_batches(self, count: int) -> None:
        async with self.entered:
            await self.entered.wait_for(lambda: len(self.batches) >= count)


def image(value: int) -> npt.NDArray[np.uint8]:
    return np.full((SIZE, SIZE, 3), value, dtype=np.uint8)


def model(max_batch_size: int) -> ModelInfo:
    return ModelInfo(
        name="category_classifier",
        version="1",
        image_size=SIZE,
        max_batch_size=max_batch_size,
        labels=("a", "b"),
    )


def make_batcher(
    inferer: FakeInferer,
    metrics: Metrics,
    *,
    max_batch_size: int,
    wait_ms: float = LONG_WAIT_MS,
    inflight: int = 4,
    queue_size: int | None = None,
) -> Batcher:
    settings = TritonSettings(max_batch_wait_ms=wait_ms, max_inflight_batches=inflight)
    return Batcher(inferer, model(max_batch_size), settings, metrics, queue_size=queue_size)


async def one_batch_in_flight(
    metrics: Metrics, *, max_batch_size: int, queue_size: int | None = None
) -> tuple[FakeInferer, Batcher, asyncio.Task[BatchResult]]:
    """A batcher with one inference slot, taken by image 0 whose batch is held at the gate."""
    inferer = FakeInferer()
    inferer.gate.clear()
    batcher = make_batcher(
        inferer, metrics, max_batch_size=max_batch_size, wait_ms=0, inflight=1,
        queue_size=queue_size,
    )  # fmt: skip
    first = asyncio.create_task(batcher.submit(image(0)))
    await inferer.wait_for_batches(1)
    return inferer, batcher, first


async def run_ready_tasks() -> None:
    """Let every task that is ready now run to its next suspension point.

    asyncio runs ready callbacks in FIFO order, so a callback scheduled now runs after the
    steps of every task created before this call; no wall-clock time is involved.
    """
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


def ids_of(batch: npt.NDArray[np.uint8]) -> list[int]:
    return [int(v) for v in batch[:, 0, 0, 0]]


async def test_a_full_batch_goes_out_without_waiting_for_the_timer(metrics: Metrics) -> None:
    inferer = FakeInferer()
    batcher = make_batcher(inferer, metrics, max_batch_size=4)

    results = await asyncio.gather(*(batcher.submit(image(i)) for i in range(8)))

    assert [ids_of(b) for b in inferer.batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for i, result in enumerate(results):
        assert isinstance(result, BatchResult)
        np.testing.assert_array_equal(result.probabilities, [i, 2 * i])
        assert result.batch_size == 4
        assert result.queue_s >= 0
        assert result.infer_s >= 0
    await batcher.aclose()


async def test_a_partial_batch_goes_out_when_the_first_image_waited_long_enough(
    metrics: Metrics,
) -> None:
    inferer = FakeInferer()
    batcher = make_batcher(inferer, metrics, max_batch_size=32, wait_ms=30)

    results = await asyncio.gather(*(batcher.submit(image(i)) for i in range(3)))

    assert [ids_of(b) for b in inferer.batches] == [[0, 1, 2]]
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert results[0].queue_s >= 0.029
    await batcher.aclose()


async def test_no_more_batches_in_flight_than_allowed(metrics: Metrics) -> None:
    inferer = FakeInferer()
    inferer.gate.clear()
    batcher = make_batcher(inferer, metrics, max_batch_size=1, inflight=2)

    tasks = [asyncio.create_task(batcher.submit(image(i))) for i in range(5)]
    await inferer.wait_for_batches(2)
    await run_ready_tasks()
    assert inferer.inflight == 2
    inferer.gate.set()
    results = await asyncio.gather(*tasks)

    assert inferer.max_inflight == 2
    assert len(inferer.batches) == 5
    assert [int(r.probabilities[0]) for r in results] == [0, 1, 2, 3, 4]
    await batcher.aclose()


async def test_while_slots_are_busy_images_gather_into_full_batches(metrics: Metrics) -> None:
    inferer, batcher, first = await one_batch_in_flight(metrics, max_batch_size=4)
    rest = [asyncio.create_task(batcher.submit(image(i))) for i in range(1, 9)]
    await run_ready_tasks()
    inferer.gate.set()
    await asyncio.gather(first, *rest)

    assert [ids_of(b) for b in inferer.batches] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    await batcher.aclose()


async def test_a_failed_batch_fails_each_of_its_submitters_and_only_them(
    metrics: Metrics,
) -> None:
    inferer = FakeInferer()
    batcher = make_batcher(inferer, metrics, max_batch_size=3)
    inferer.failure = InferenceUnavailableError("Triton is down")

    outcomes = await asyncio.gather(
        *(batcher.submit(image(i)) for i in range(3)), return_exceptions=True
    )

    assert all(isinstance(o, InferenceUnavailableError) for o in outcomes)
    inferer.failure = None
    later = await asyncio.gather(*(batcher.submit(image(i)) for i in range(3, 6)))
    assert [int(r.probabilities[0]) for r in later] == [3, 4, 5]
    await batcher.aclose()


async def test_a_contract_error_reaches_the_submitters_too(metrics: Metrics) -> None:
    inferer = FakeInferer()
    inferer.failure = ModelContractError("Triton refused a batch")
    batcher = make_batcher(inferer, metrics, max_batch_size=1)

    with pytest.raises(ModelContractError, match="refused"):
        await batcher.submit(image(1))
    await batcher.aclose()


async def test_a_cancelled_submitter_does_not_disturb_its_batch(metrics: Metrics) -> None:
    inferer = FakeInferer()
    inferer.gate.clear()
    batcher = make_batcher(inferer, metrics, max_batch_size=3)
    tasks = [asyncio.create_task(batcher.submit(image(i))) for i in range(3)]
    await inferer.wait_for_batches(1)

    tasks[1].cancel()
    inferer.gate.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert [int(o.probabilities[0]) for o in (outcomes[0], outcomes[2])] == [0, 2]  # type: ignore[union-attr]
    await batcher.aclose()


async def test_an_image_cancelled_while_queued_is_not_sent(metrics: Metrics) -> None:
    inferer, batcher, first = await one_batch_in_flight(metrics, max_batch_size=4)
    queued = [asyncio.create_task(batcher.submit(image(i))) for i in (1, 2, 3)]
    await run_ready_tasks()

    queued[0].cancel()
    inferer.gate.set()
    outcomes = await asyncio.gather(first, *queued, return_exceptions=True)

    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert [ids_of(b) for b in inferer.batches] == [[0], [2, 3]]
    await batcher.aclose()


async def test_a_full_queue_holds_submitters_back(metrics: Metrics) -> None:
    inferer, batcher, first = await one_batch_in_flight(metrics, max_batch_size=1, queue_size=2)

    later = [asyncio.create_task(batcher.submit(image(i))) for i in (1, 2, 3, 4)]
    await run_ready_tasks()
    # The queue holds 1 and 2; 3 and 4 wait for room. Cancelling 3 leaves no trace.
    assert batcher.waiting == 2
    later[2].cancel()
    inferer.gate.set()
    outcomes = await asyncio.gather(first, *later, return_exceptions=True)

    assert isinstance(outcomes[3], asyncio.CancelledError)
    assert [ids_of(b) for b in inferer.batches] == [[0], [1], [2], [4]]
    await batcher.aclose()


@pytest.mark.timeout(10)
async def test_aclose_sends_what_is_queued_and_waits_for_it(metrics: Metrics) -> None:
    inferer = FakeInferer()
    batcher = make_batcher(inferer, metrics, max_batch_size=8)
    tasks = [asyncio.create_task(batcher.submit(image(i))) for i in range(3)]
    await run_ready_tasks()

    # The batch is not full and the timer is an hour: only aclose() sends it.
    await batcher.aclose()

    assert all(t.done() for t in tasks)
    assert [int(t.result().probabilities[0]) for t in tasks] == [0, 1, 2]
    assert [ids_of(b) for b in inferer.batches] == [[0, 1, 2]]
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(image(9))


async def test_aclose_of_an_unused_batcher_returns(metrics: Metrics) -> None:
    await make_batcher(FakeInferer(), metrics, max_batch_size=8).aclose()


async def test_a_cancelled_aclose_fails_what_is_in_flight_and_queued(metrics: Metrics) -> None:
    inferer = FakeInferer()
    inferer.gate.clear()
    batcher = make_batcher(inferer, metrics, max_batch_size=1, wait_ms=0, inflight=1)
    tasks = [asyncio.create_task(batcher.submit(image(i))) for i in range(3)]
    await inferer.wait_for_batches(1)

    closing = asyncio.create_task(batcher.aclose())
    await run_ready_tasks()
    closing.cancel()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    assert all(isinstance(o, InferenceUnavailableError) for o in outcomes)
    with pytest.raises(asyncio.CancelledError):
        await closing


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((SIZE, SIZE, 3), dtype=np.float32),
        np.zeros((SIZE, SIZE), dtype=np.uint8),
        np.zeros((SIZE + 1, SIZE, 3), dtype=np.uint8),
    ],
    ids=["float32", "grey", "wrong size"],
)
async def test_an_image_of_the_wrong_shape_fails_alone(
    metrics: Metrics, bad: npt.NDArray[Any]
) -> None:
    inferer = FakeInferer()
    batcher = make_batcher(inferer, metrics, max_batch_size=2)

    good = asyncio.create_task(batcher.submit(image(1)))
    with pytest.raises(ValueError, match="expected a uint8 image"):
        await batcher.submit(bad)
    other = await batcher.submit(image(2))

    assert int((await good).probabilities[0]) == 1
    assert int(other.probabilities[0]) == 2
    await batcher.aclose()


async def test_batches_and_stage_latencies_are_recorded(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    inferer = FakeInferer()
    batcher = make_batcher(inferer, metrics, max_batch_size=4)

    await asyncio.gather(*(batcher.submit(image(i)) for i in range(8)))
    await batcher.aclose()

    assert registry.get_sample_value("suggester_batch_size_count") == 2
    assert registry.get_sample_value("suggester_batch_size_sum") == 8
    for stage in ("queue", "infer"):
        count = registry.get_sample_value("suggester_stage_latency_seconds_count", {"stage": stage})
        assert count == 8, stage
