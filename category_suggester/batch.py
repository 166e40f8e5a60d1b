"""Batch: single decoded images into inference batches, and the results back to each image.

Takes one uint8 image `[S, S, 3]` per `submit()` call and returns that image's probability
row with its timings (`BatchResult`). Images wait in a bounded queue; a batch is sent when
`max_batch_size` images are waiting or `triton.max_batch_wait_ms` has passed since the
first of them was submitted, whichever comes first, with at most
`triton.max_inflight_batches` batches in flight. A full queue makes `submit()` wait: that is
the back-pressure that reaches the consumer.

Raises, from `submit()`: whatever the inference of the image's batch raised
(`InferenceUnavailableError`, `ModelContractError`), to every submitter of that batch;
`ValueError` for an image of the wrong shape or dtype (only that submitter);
`RuntimeError` once the batcher is closed. A submitter that is cancelled leaves the others
alone; its image is dropped from its batch if the batch has not been sent yet.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from category_suggester.errors import InferenceUnavailableError
from category_suggester.infer import ModelInfo
from category_suggester.metrics import Metrics
from category_suggester.settings import TritonSettings


class BatchInferer(Protocol):
    """What the batcher sends batches to (`TritonClassifier` in the service)."""

    async def infer(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One image's share of a batch: its probabilities `(C,)` and where its time went.

    `queue_s` runs from `submit()` to the batch being sent (including any wait for room in
    the queue), `infer_s` is the batch's inference time, `batch_size` the images sent with it.
    """

    probabilities: npt.NDArray[np.float32]
    queue_s: float
    infer_s: float
    batch_size: int


@dataclass(slots=True)
class _Pending:
    image: npt.NDArray[np.uint8]
    future: asyncio.Future[BatchResult]
    submitted_at: float


class _Close:
    """Queued by aclose() behind the last image: the collector stops when it reaches it."""


_CLOSE = _Close()


class Batcher:
    """An asyncio micro-batcher in front of a `BatchInferer`; see the module docstring.

    `model` gives the image size and the batch size (already capped by the settings);
    `queue_size` bounds the images waiting to be sent (default: one full batch per
    in-flight slot). Use from one event loop; `aclose()` sends what is queued, waits for the
    batches in flight, and stops.
    """

    def __init__(
        self,
        classifier: BatchInferer,
        model: ModelInfo,
        settings: TritonSettings,
        metrics: Metrics,
        *,
        queue_size: int | None = None,
    ) -> None:
        self._classifier = classifier
        self._image_shape = (model.image_size, model.image_size, 3)
        self._max_batch_size = model.max_batch_size
        self._max_wait_s = settings.max_batch_wait_ms / 1000.0
        self._metrics = metrics
        self._queue_latency = metrics.stage_latency.labels(stage="queue")
        self._infer_latency = metrics.stage_latency.labels(stage="infer")
        self._queue: asyncio.Queue[_Pending | _Close] = asyncio.Queue(
            maxsize=queue_size or model.max_batch_size * settings.max_inflight_batches
        )
        self._slots = asyncio.Semaphore(settings.max_inflight_batches)
        self._inflight: set[asyncio.Task[None]] = set()
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        # Set when the collector is gone for good (a cancelled aclose): nothing reads the
        # queue any more, so an image that still gets in must be failed by its submitter.
        self._aborted = False
        # Submitters between the closed check and their image entering the queue; aclose()
        # waits for them so that the close marker is queued behind every accepted image.
        self._entering = 0
        self._nobody_entering = asyncio.Event()
        self._nobody_entering.set()

    @property
    def waiting(self) -> int:
        """Images queued and not yet taken into a batch (at most queue_size).

        Submitters held back by a full queue are not counted; while closing, the count may
        include the close marker.
        """
        return self._queue.qsize()

    async def submit(self, image: npt.NDArray[np.uint8]) -> BatchResult:
        """Classify one image `[S, S, 3]` uint8 as part of a batch; see the module docstring."""
        if self._closed:
            raise RuntimeError("the Batcher is closed")
        if image.dtype != np.uint8 or image.shape != self._image_shape:
            raise ValueError(
                f"expected a uint8 image of shape {self._image_shape}, got "
                f"{image.dtype} {image.shape}"
            )
        loop = asyncio.get_running_loop()
        if self._collector is None:
            self._collector = loop.create_task(self._collect(), name="batcher-collector")
        pending = _Pending(image, loop.create_future(), loop.time())
        self._entering += 1
        self._nobody_entering.clear()
        try:
            await self._queue.put(pending)
        finally:
            self._entering -= 1
            if self._entering == 0:
                self._nobody_entering.set()
        if self._aborted:
            self._fail_queued(InferenceUnavailableError("the batcher was closed before sending"))
        return await pending.future

    async def aclose(self) -> None:
        """Stop accepting images, send the queued ones, wait for every batch in flight.

        If aclose() itself is cancelled (a shutdown deadline), the batches in flight are
        cancelled and every waiting submitter gets `InferenceUnavailableError`.
        """
        self._closed = True
        if self._collector is None:
            return
        try:
            await self._nobody_entering.wait()
            await self._queue.put(_CLOSE)
            await self._collector
            while self._inflight:
                await asyncio.wait(set(self._inflight))
        except asyncio.CancelledError:
            self._aborted = True
            self._collector.cancel()
            for task in set(self._inflight):
                task.cancel()
            self._fail_queued(InferenceUnavailableError("the batcher was closed before sending"))
            raise

    async def _collect(self) -> None:
        """Forms batches from the queue and starts one task per batch, forever until closed."""
        try:
            while True:
                await self._slots.acquire()
                batch = await self._next_batch()
                if batch:
                    task = asyncio.create_task(self._send(batch), name="batcher-batch")
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                else:
                    self._slots.release()
                if batch is None:
                    return
        except BaseException:
            # Nobody would ever answer the queued submitters otherwise.
            self._aborted = True
            self._fail_queued(InferenceUnavailableError("the batcher stopped unexpectedly"))
            raise

    async def _next_batch(self) -> list[_Pending] | None:
        """The next batch of live submissions; None when the close marker was reached.

        Returns a (possibly short or empty) batch when the close marker came after some
        images: they are sent, and the next call returns None.
        """
        first = await self._queue.get()
        while isinstance(first, _Pending) and first.future.done():
            first = await self._queue.get()  # its submitter was cancelled while queued
        if isinstance(first, _Close):
            return None
        batch = [first]
        deadline = first.submitted_at + self._max_wait_s
        while len(batch) < self._max_batch_size:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    # The one legitimate timer: how long the first image may wait for company.
                    async with asyncio.timeout_at(deadline):
                        item = await self._queue.get()
                except TimeoutError:
                    break
            if isinstance(item, _Close):
                # Put it back so that the next call ends the collector after this batch.
                self._queue.put_nowait(item)
                break
            if not item.future.done():
                batch.append(item)
        return batch

    async def _send(self, batch: list[_Pending]) -> None:
        """Infers one batch and settles every submitter's future; releases the in-flight slot."""
        loop = asyncio.get_running_loop()
        try:
            live = [p for p in batch if not p.future.done()]
            if not live:
                return
            images = np.stack([p.image for p in live])
            started = loop.time()
            try:
                probabilities = await self._classifier.infer(images)
            except asyncio.CancelledError:
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(
                            InferenceUnavailableError("the batch was cancelled at shutdown")
                        )
                raise
            except Exception as exc:  # noqa: BLE001  (handed to every submitter of the batch)
                for pending in live:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                return
            infer_s = loop.time() - started
            self._metrics.batch_size.observe(len(live))
            for index, pending in enumerate(live):
                queue_s = started - pending.submitted_at
                self._queue_latency.observe(queue_s)
                self._infer_latency.observe(infer_s)
                if not pending.future.done():
                    pending.future.set_result(
                        BatchResult(probabilities[index], queue_s, infer_s, len(live))
                    )
        finally:
            self._slots.release()

    def _fail_queued(self, error: InferenceUnavailableError) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, _Pending) and not item.future.done():
                item.future.set_exception(error)
