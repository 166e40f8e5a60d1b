"""Triton Python-backend model for the fault tests: the model contract, cheap and slowable.

Takes: requests with input `image` (UINT8, [n, S, S, 3]).
Returns: one response per request with output `probabilities` (FP32, [n, C]): a softmax
over a fixed projection of each image's mean colour, so answers depend on the image and
cost microseconds (the ResNet on this CPU manages a few dozen images a second; the fault
tests need thousands).
Raises: nothing out of execute(); a request without the input gets an error response.

Slowing it down: when the file `delay_s` exists in the model's directory, every execute()
first sleeps that many seconds (read on each call, so a test changes it while serving).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        self._input_name = config["input"][0]["name"]
        self._output_name = config["output"][0]["name"]
        classes = int(config["output"][0]["dims"][0])
        self._projection = np.random.default_rng(0).normal(size=(3, classes)).astype(np.float32)
        self._delay_file = Path(args["model_repository"]) / "delay_s"

    def execute(self, requests: list[Any]) -> list[Any]:
        self._maybe_sleep()
        responses = []
        for request in requests:
            tensor = pb_utils.get_input_tensor_by_name(request, self._input_name)
            if tensor is None:
                error = pb_utils.TritonError(f"input {self._input_name!r} is missing")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            images = tensor.as_numpy()
            means = images.reshape(images.shape[0], -1, 3).mean(axis=1, dtype=np.float32) / 64.0
            logits = means @ self._projection
            logits -= logits.max(axis=1, keepdims=True)
            exp = np.exp(logits)
            probabilities = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(self._output_name, probabilities)]
                )
            )
        return responses

    def _maybe_sleep(self) -> None:
        try:
            delay = float(self._delay_file.read_text())
        except (FileNotFoundError, ValueError):
            return
        if delay > 0:
            time.sleep(delay)
