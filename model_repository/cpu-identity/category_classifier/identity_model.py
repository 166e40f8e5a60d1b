"""Triton Python-backend model for the overhead benchmark: a constant row per image.

Takes: requests with input `image` (UINT8, [n, S, S, 3]).
Returns: one response per request with output `probabilities` (FP32, [n, C]), every row the
same fixed distribution over the C classes of labels.txt (the first class on top).
Raises: nothing out of execute(); a request without the input gets an error response.

It reads nothing but the batch size, so the cost Triton adds per image is the server's and
the stub's own, not a model's.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._input_name = config["input"][0]["name"]
        self._output_name = config["output"][0]["name"]
        classes = int(config["output"][0]["dims"][0])
        row = np.full(classes, 0.4 / max(1, classes - 1), dtype=np.float32)
        row[0] = 0.6 if classes > 1 else 1.0
        self._row = row

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self._input_name)
            if tensor is None:
                error = pb_utils.TritonError(f"input {self._input_name!r} is missing")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            count = tensor.as_numpy().shape[0]
            rows = np.ascontiguousarray(np.broadcast_to(self._row, (count, self._row.shape[0])))
            responses.append(
                pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self._output_name, rows)])
            )
        return responses

    def finalize(self) -> None:
        self._row = None
