"""Triton Python-backend model: runs the exported ONNX file with onnxruntime on CPU.

Copied to `<version>/model.py` by `training.repository.add_version`; it loads
`<version>/model.onnx`, the same file the production repository serves with the
onnxruntime backend, so development and CI exercise the real graph and the real server.

Takes: requests with input `image` (UINT8, [n, S, S, 3]), n >= 1 per request.
Returns: one response per request with output `probabilities` (FP32, [n, C]).
Raises: nothing out of execute(); a failure becomes a pb_utils.TritonError on the
responses it concerns, so the stub keeps serving.

Triton's dynamic batcher hands execute() several requests at once; they are concatenated
into ONE onnxruntime run and the result is split back, which is what makes batching real.
Config parameters (string values): `intra_op_thread_count` (default 2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

_DEFAULT_INTRA_OP_THREADS = 2


class TritonPythonModel:
    """One onnxruntime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._input_name = config["input"][0]["name"]
        self._output_name = config["output"][0]["name"]
        self._input_dtype = pb_utils.triton_string_to_numpy(config["input"][0]["data_type"])
        self._input_dims = tuple(int(d) for d in config["input"][0]["dims"])
        parameters = config.get("parameters", {})
        threads = int(
            parameters.get("intra_op_thread_count", {}).get(
                "string_value", _DEFAULT_INTRA_OP_THREADS
            )
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # One graph, run sequentially: inter-op threads would only compete with intra-op ones.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # No busy-waiting between runs: the intra-op threads would otherwise spin on cores
        # that the consumer's event loop and decode threads need (on this CPU repository
        # they share the machine), which at low load costs latency rather than saving it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        model_file = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self._session = ort.InferenceSession(
            str(model_file), sess_options=options, providers=["CPUExecutionProvider"]
        )
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if [i.name for i in inputs] != [self._input_name] or [o.name for o in outputs] != [
            self._output_name
        ]:
            raise pb_utils.TritonModelException(
                f"{model_file} has inputs {[i.name for i in inputs]} and outputs "
                f"{[o.name for o in outputs]}; config.pbtxt names "
                f"{self._input_name!r} and {self._output_name!r}"
            )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        batch: list[npt.NDArray[Any]] = []
        batched: list[int] = []
        for index, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, self._input_name)
            if tensor is None:
                responses[index] = self._error(f"input {self._input_name!r} is missing")
                continue
            array = tensor.as_numpy()
            if array.dtype != self._input_dtype or tuple(array.shape[1:]) != self._input_dims:
                responses[index] = self._error(
                    f"input {self._input_name!r} is {array.dtype}{list(array.shape)}, expected "
                    f"{np.dtype(self._input_dtype)}[n, {', '.join(map(str, self._input_dims))}]"
                )
                continue
            batch.append(array)
            batched.append(index)
        if not batch:
            return responses
        try:
            (probabilities,) = self._session.run(
                [self._output_name], {self._input_name: np.concatenate(batch)}
            )
        # The serving boundary: whatever fails in the run (onnxruntime's errors derive from
        # Exception only) is answered to the requests in it; raising would fail them all
        # without a message and leave the stub in an unknown state.
        except Exception as exc:  # noqa: BLE001
            for index in batched:
                responses[index] = self._error(f"{type(exc).__name__}: {exc}")
            return responses
        offsets = np.cumsum([array.shape[0] for array in batch])[:-1]
        for index, part in zip(batched, np.split(probabilities, offsets), strict=True):
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self._output_name, np.ascontiguousarray(part))]
            )
        return responses

    def finalize(self) -> None:
        self._session = None

    @staticmethod
    def _error(message: str) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
