"""A fake tritonclient (gRPC, asyncio) that answers like tritonserver serving the model
contract's model: for the unit tests of the Triton client and of the service's start."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

LABELS = ["books", "car", "furniture", "mobile", "motorcycle"]


def unavailable(message: str = "failed to connect to all addresses") -> InferenceServerException:
    return InferenceServerException(msg=message, status="StatusCode.UNAVAILABLE")


def fake_probabilities(images: npt.NDArray[np.uint8], num_classes: int) -> npt.NDArray[np.float32]:
    """A deterministic row per image: a softmax of the image's mean times the class index."""
    means = images.reshape(images.shape[0], -1).mean(axis=1, keepdims=True) / 255.0
    logits = means * np.arange(num_classes)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities: npt.NDArray[np.float32] = (exp / exp.sum(axis=1, keepdims=True)).astype(
        np.float32
    )
    return probabilities


class FakeResult:
    def __init__(self, outputs: dict[str, npt.NDArray[Any]], version: str) -> None:
        self._outputs = outputs
        self._version = version

    def as_numpy(self, name: str) -> npt.NDArray[Any] | None:
        return self._outputs.get(name)

    def get_response(self, as_json: bool = False) -> Any:
        assert as_json
        return {"model_name": "category_classifier", "model_version": self._version}


class FakeTriton:
    """Answers like tritonserver serving the contract's model (JSON forms, as_json=True).

    Tests edit `config`, `metadata`, the readiness flags, `labels`, or queue exceptions in
    `failures` (raised by the next infer calls, one each).
    """

    def __init__(self, *, image_size: int = 112, max_batch_size: int = 64) -> None:
        size = str(image_size)
        self.config: dict[str, Any] = {
            "name": "category_classifier",
            "max_batch_size": max_batch_size,
            "input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [size, size, "3"]}],
            "output": [
                {
                    "name": "probabilities",
                    "data_type": "TYPE_FP32",
                    "dims": [str(len(LABELS))],
                    "label_filename": "labels.txt",
                }
            ],
            "parameters": {
                "intra_op_thread_count": {"string_value": "2"},
                "confidence_threshold": {"string_value": "0.8125"},
            },
        }
        self.metadata: dict[str, Any] = {
            "name": "category_classifier",
            "versions": ["3"],
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": ["-1", size, size, "3"]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": ["-1", str(len(LABELS))]}
            ],
        }
        self.labels: list[str | None] = list(LABELS)
        self.live = True
        self.server_ready = True
        self.model_ready = True
        # Readiness answers to give before the flags above: False or an exception each.
        self.not_ready_answers: list[bool | Exception] = []
        self.failures: list[BaseException] = []
        self.wrong_output_shape = False
        self.infer_calls = 0
        self.batches: list[npt.NDArray[np.uint8]] = []
        self.closed = False
        self.infer_called = asyncio.Event()

    async def _health(self, flag: bool) -> bool:
        if self.not_ready_answers:
            answer = self.not_ready_answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        return flag

    async def is_server_live(self, *, client_timeout: float | None = None) -> bool:
        return await self._health(self.live)

    async def is_server_ready(self, *, client_timeout: float | None = None) -> bool:
        return await self._health(self.server_ready)

    async def is_model_ready(
        self, model_name: str, model_version: str = "", *, client_timeout: float | None = None
    ) -> bool:
        return await self._health(self.model_ready)

    async def get_model_config(
        self,
        model_name: str,
        model_version: str = "",
        *,
        as_json: bool = False,
        client_timeout: float | None = None,
    ) -> Any:
        assert as_json
        return {"config": copy.deepcopy(self.config)}

    async def get_model_metadata(
        self,
        model_name: str,
        model_version: str = "",
        *,
        as_json: bool = False,
        client_timeout: float | None = None,
    ) -> Any:
        assert as_json
        return copy.deepcopy(self.metadata)

    async def infer(
        self,
        model_name: str,
        inputs: list[grpcclient.InferInput],
        model_version: str = "",
        *,
        outputs: list[grpcclient.InferRequestedOutput] | None = None,
        client_timeout: float | None = None,
    ) -> FakeResult:
        self.infer_calls += 1
        self.infer_called.set()
        assert client_timeout is not None, "every request carries a deadline"
        if self.failures:
            raise self.failures.pop(0)
        (image,) = inputs
        assert image.name() == "image"
        assert image.datatype() == "UINT8"
        # The fake reads back the bytes the request would put on the wire.
        images = np.frombuffer(image._get_content(), dtype=np.uint8).reshape(image.shape())
        self.batches.append(images)
        probabilities = fake_probabilities(images, len(LABELS))
        assert outputs is not None
        (requested,) = outputs
        class_count = requested._get_tensor().parameters["classification"].int64_param
        if class_count:
            return FakeResult({"probabilities": self._classify(probabilities)}, "3")
        if self.wrong_output_shape:
            probabilities = probabilities[:, :-1]
        return FakeResult({"probabilities": probabilities}, "3")

    def _classify(self, probabilities: npt.NDArray[np.float32]) -> npt.NDArray[np.object_]:
        rows = []
        for row in probabilities:
            entries = []
            for index in np.argsort(-row, kind="stable"):
                label = self.labels[index]
                text = f"{row[index]:f}:{index}" + ("" if label is None else f":{label}")
                entries.append(text.encode())
            rows.append(entries)
        return np.array(rows, dtype=np.object_)

    async def close(self) -> None:
        self.closed = True
