"""Infer: a batch of decoded images into class probabilities, on Triton over gRPC.

Takes a contiguous uint8 array `[B, S, S, 3]` (RGB, B at most the model's batch size) and
returns float32 probabilities `[B, C]`, one row per image in the same order.

`TritonClassifier.connect()` runs once at start-up: it waits (up to a deadline) for the
server and the model to be ready, checks the served model against the contract in DESIGN.md
(model `category_classifier`, input `image` UINT8 `[-1, S, S, 3]`, output `probabilities`
FP32 `[-1, C]` with a `label_filename`, max_batch_size > 0) and reads the class names from
Triton itself with the classification extension, so the service never ships its own copy
of the labels. It also reads the model's recommended confidence threshold, the string
parameter `confidence_threshold` of the model config that export writes from evaluate's
threshold.json (None when the model has none, or one that is not a number in [0, 1]).

Raises:
- `ModelContractError` when the served model breaks the contract (at start-up), or when
  Triton refuses a request as invalid later on (a new model version with another contract);
  retrying cannot help.
- `InferenceUnavailableError` when Triton is not ready before the start-up deadline, or
  when an outage outlasts the moment the `stop` event is set: until then an unavailable,
  overloaded or timed-out Triton is retried with capped, jittered exponential backoff
  (an outage is not the event's fault, so it is never reported as bad input).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

from category_suggester.errors import InferenceUnavailableError, ModelContractError
from category_suggester.metrics import Metrics
from category_suggester.retry import Backoff, wait_or_stop
from category_suggester.settings import TritonSettings

LOGGER = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
THRESHOLD_PARAMETER = "confidence_threshold"

# gRPC statuses that mean "Triton is unwell or busy right now", not "the request is wrong":
# a restart (UNAVAILABLE), overload or a slow model (DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED),
# a model being reloaded or removed (NOT_FOUND), a crashed backend process that Triton
# restarts (INTERNAL, UNKNOWN). Anything else (INVALID_ARGUMENT above all) is a contract
# break that no retry fixes.
_OUTAGE_STATUSES = frozenset(
    f"StatusCode.{name}"
    for name in (
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "CANCELLED",
        "NOT_FOUND",
        "INTERNAL",
        "UNKNOWN",
    )
)


class InferResultLike(Protocol):
    """The part of `tritonclient.grpc.InferResult` this module reads."""

    def as_numpy(self, name: str) -> npt.NDArray[Any] | None: ...

    def get_response(self, as_json: bool = False) -> Any: ...


class TritonClient(Protocol):
    """The part of `tritonclient.grpc.aio.InferenceServerClient` this module calls."""

    async def is_server_live(self, *, client_timeout: float | None = None) -> bool: ...

    async def is_server_ready(self, *, client_timeout: float | None = None) -> bool: ...

    async def is_model_ready(
        self, model_name: str, model_version: str = "", *, client_timeout: float | None = None
    ) -> bool: ...

    async def get_model_metadata(
        self,
        model_name: str,
        model_version: str = "",
        *,
        as_json: bool = False,
        client_timeout: float | None = None,
    ) -> Any: ...

    async def get_model_config(
        self,
        model_name: str,
        model_version: str = "",
        *,
        as_json: bool = False,
        client_timeout: float | None = None,
    ) -> Any: ...

    async def infer(
        self,
        model_name: str,
        inputs: list[grpcclient.InferInput],
        model_version: str = "",
        *,
        outputs: list[grpcclient.InferRequestedOutput] | None = None,
        client_timeout: float | None = None,
    ) -> InferResultLike: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the service learned about the served model at start-up.

    `version` is the version Triton served the start-up request with; `max_batch_size` is
    the smaller of the model's and `triton.max_batch_size`; `labels` holds the C class
    names in output order; `confidence_threshold` is the model's recommended threshold for
    the `confident` flag, in [0, 1], or None when it recommends none.
    """

    name: str
    version: str
    image_size: int
    max_batch_size: int
    labels: tuple[str, ...]
    confidence_threshold: float | None = None


@dataclass(frozen=True, slots=True)
class _Contract:
    image_size: int
    num_classes: int
    max_batch_size: int


class _NotReadyYetError(Exception):
    """Triton answered but is not ready yet; connect() keeps waiting."""


def _is_outage(exc: BaseException) -> bool:
    if isinstance(exc, InferenceServerException):
        return exc.status() in _OUTAGE_STATUSES
    # The gRPC layer reports lost connections as UNAVAILABLE; these cover the socket and
    # timer errors that can still surface around it.
    return isinstance(exc, OSError | TimeoutError)


def _dims(shape: Sequence[Any]) -> list[int]:
    # Model metadata in JSON form spells int64 dimensions as strings.
    return [int(d) for d in shape]


def _check_contract(
    model_name: str, config: Mapping[str, Any], metadata: Mapping[str, Any]
) -> _Contract:
    """Check a model's config and metadata (tritonclient's JSON forms) against the contract.

    Returns the image size S, the number of classes C and the model's max_batch_size;
    raises `ModelContractError` naming the first mismatch.
    """

    def broken(what: str) -> ModelContractError:
        return ModelContractError(f"model {model_name!r} breaks the contract: {what}")

    max_batch_size = int(config.get("max_batch_size", 0))
    if max_batch_size <= 0:
        raise broken(
            f"max_batch_size is {max_batch_size}; it must be > 0 (the service sends batches)"
        )

    inputs = list(metadata.get("inputs", []))
    input_names = [str(i.get("name")) for i in inputs]
    if input_names != [INPUT_NAME]:
        raise broken(f"its inputs are {input_names}; expected exactly one input {INPUT_NAME!r}")
    image = inputs[0]
    if image.get("datatype") != "UINT8":
        raise broken(
            f"input {INPUT_NAME!r} has datatype {image.get('datatype')}; expected UINT8 "
            "(normalisation lives inside the model)"
        )
    shape = _dims(image.get("shape", []))
    if not (
        len(shape) == 4
        and shape[0] == -1
        and shape[1] == shape[2]
        and shape[1] > 0
        and shape[3] == 3
    ):
        raise broken(
            f"input {INPUT_NAME!r} has shape {shape}; expected NHWC [-1, S, S, 3] with a fixed S"
        )
    for config_input in config.get("input", []):
        if config_input.get("name") == INPUT_NAME and config_input.get("format") == "FORMAT_NCHW":
            raise broken(f"input {INPUT_NAME!r} is declared FORMAT_NCHW; expected NHWC")

    outputs = {str(o.get("name")): o for o in metadata.get("outputs", [])}
    if OUTPUT_NAME not in outputs:
        raise broken(f"its outputs are {sorted(outputs)}; expected an output {OUTPUT_NAME!r}")
    output = outputs[OUTPUT_NAME]
    if output.get("datatype") != "FP32":
        raise broken(f"output {OUTPUT_NAME!r} has datatype {output.get('datatype')}; expected FP32")
    out_shape = _dims(output.get("shape", []))
    if not (len(out_shape) == 2 and out_shape[0] == -1 and out_shape[1] > 0):
        raise broken(
            f"output {OUTPUT_NAME!r} has shape {out_shape}; expected [-1, C] with a fixed C"
        )
    config_outputs = {str(o.get("name")): o for o in config.get("output", [])}
    if not config_outputs.get(OUTPUT_NAME, {}).get("label_filename"):
        raise broken(
            f"output {OUTPUT_NAME!r} has no label_filename; put labels.txt beside config.pbtxt "
            'and set label_filename: "labels.txt" on the output'
        )
    return _Contract(image_size=shape[1], num_classes=out_shape[1], max_batch_size=max_batch_size)


def _recommended_threshold(model_name: str, config: Mapping[str, Any]) -> float | None:
    """The model config's `confidence_threshold` parameter (tritonclient's JSON form).

    None when absent; None and a warning when it is not a number in [0, 1]: a bad
    recommendation must not stop the service, which then uses its own threshold.
    """
    parameter = config.get("parameters", {}).get(THRESHOLD_PARAMETER)
    if parameter is None:
        return None
    text = parameter.get("string_value") if isinstance(parameter, Mapping) else None
    try:
        value = float(text) if isinstance(text, str) else math.nan
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        LOGGER.warning(
            "ignoring the model's threshold parameter, which is not a number in [0, 1]",
            extra={
                "model": model_name,
                "parameter": THRESHOLD_PARAMETER,
                "value": repr(text if text is not None else parameter),
            },
        )
        return None
    return value


def _parse_classification(
    model_name: str, entries: Sequence[Any], num_classes: int
) -> tuple[str, ...]:
    """Read the class names from one row of Triton classification results.

    Triton answers a request for `class_count=C` with C strings `"score:index:label"`
    (sorted by score); the labels come from the output's label_filename. Raises
    `ModelContractError` when a label is missing, an index is out of range or repeated, or
    two classes share a name.
    """
    labels: list[str | None] = [None] * num_classes
    for entry in entries:
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        parts = text.split(":", 2)  # a label may itself contain ':'
        if len(parts) != 3 or not parts[2]:
            raise ModelContractError(
                f"model {model_name!r}: Triton's classification result {text!r} has no "
                "label; labels.txt must name every class, one per line"
            )
        index = int(parts[1])
        if not 0 <= index < num_classes or labels[index] is not None:
            raise ModelContractError(
                f"model {model_name!r}: unexpected class index {index} in classification "
                f"result {text!r} (C={num_classes})"
            )
        labels[index] = parts[2]
    if any(label is None for label in labels):
        missing = [i for i, label in enumerate(labels) if label is None]
        raise ModelContractError(f"model {model_name!r}: no labels for classes {missing}")
    named = tuple(label for label in labels if label is not None)
    if len(set(named)) != len(named):
        raise ModelContractError(f"model {model_name!r}: duplicate class names {list(named)}")
    return named


class TritonClassifier:
    """Runs the category model on Triton.

    `connect()` first (once); then `infer()` from any number of tasks; `ready()` for the
    readiness probe; `aclose()` at the end (it closes the client). The `stop` event, set at
    shutdown, ends the retrying of an outage (see the module docstring).
    """

    def __init__(
        self,
        settings: TritonSettings,
        metrics: Metrics,
        *,
        client: TritonClient | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        # Created now so that the series exists (at 0) before the first retry.
        self._retries = metrics.retries.labels(stage="infer")
        self._client = client
        self._stop = stop if stop is not None else asyncio.Event()
        self._info: ModelInfo | None = None
        self._failing = False
        # Half jitter: the retries of many replicas (and batches) after a Triton restart
        # spread out, and none comes back at once.
        self._backoff = Backoff(
            settings.retry_backoff_base_s, settings.retry_backoff_max_s, floor=0.5
        )

    @property
    def info(self) -> ModelInfo:
        """The model learned by connect(); RuntimeError before it."""
        if self._info is None:
            raise RuntimeError("TritonClassifier.connect() has not succeeded yet")
        return self._info

    def _get_client(self) -> TritonClient:
        if self._client is None:
            # Created lazily so that the gRPC channel binds to the running event loop.
            self._client = grpcaio.InferenceServerClient(
                self._settings.url, channel_args=self._channel_args()
            )
        return self._client

    def _channel_args(self) -> list[tuple[str, int]]:
        keepalive = grpcclient.KeepAliveOptions()
        reconnect_max_ms = max(100, int(self._settings.retry_backoff_max_s * 1000))
        return [
            # tritonclient's own defaults (passing channel_args replaces all of them)...
            ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(keepalive.keepalive_permit_without_calls)),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            # ...plus a cap on the channel's reconnect backoff, which otherwise grows to 120 s:
            # after a long outage the channel would stay down that long after Triton is back,
            # failing every retry fast.
            ("grpc.initial_reconnect_backoff_ms", min(1000, reconnect_max_ms)),
            ("grpc.max_reconnect_backoff_ms", reconnect_max_ms),
        ]

    async def connect(self, deadline: float | None = None) -> ModelInfo:
        """Wait for Triton and the model, check the contract, read the labels.

        `deadline` is a time on the running loop's clock (`loop.time()`); by default
        `triton.ready_timeout_s` from now. Returns the `ModelInfo` (also kept as `.info`).
        Raises `ModelContractError` at once on a mismatch, `InferenceUnavailableError` if
        Triton or the model is not ready by the deadline.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._settings.ready_timeout_s
        client = self._get_client()
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            try:
                info = await self._check(client, max(remaining, 0.001))
            except _NotReadyYetError as exc:
                why = str(exc)
            except (InferenceServerException, OSError, TimeoutError) as exc:
                if not _is_outage(exc):
                    raise ModelContractError(
                        f"Triton at {self._settings.url} refused the start-up checks of model "
                        f"{self._settings.model_name!r}: {exc}"
                    ) from exc
                why = str(exc)
            else:
                self._info = info
                self._metrics.model_ready.set(1)
                LOGGER.info(
                    "model ready",
                    extra={
                        "model": info.name,
                        "version": info.version,
                        "image_size": info.image_size,
                        "classes": len(info.labels),
                        "max_batch_size": info.max_batch_size,
                        "recommended_threshold": info.confidence_threshold,
                    },
                )
                return info
            self._metrics.model_ready.set(0)
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise InferenceUnavailableError(
                    f"Triton at {self._settings.url} did not get ready to serve model "
                    f"{self._settings.model_name!r} within the start-up deadline: {why}"
                )
            LOGGER.info("waiting for Triton", extra={"url": self._settings.url, "error": why})
            # Triton has no readiness notification; polling with backoff is the only way.
            await asyncio.sleep(min(self._backoff.delay_s(attempt), remaining))
            attempt += 1

    async def _check(self, client: TritonClient, call_timeout_s: float) -> ModelInfo:
        name = self._settings.model_name
        version = self._settings.model_version
        timeout = min(call_timeout_s, self._settings.request_timeout_s)
        if not await client.is_server_live(client_timeout=timeout):
            raise _NotReadyYetError("server not live")
        if not await client.is_server_ready(client_timeout=timeout):
            raise _NotReadyYetError("server not ready")
        if not await client.is_model_ready(name, version, client_timeout=timeout):
            raise _NotReadyYetError(f"model {name!r} version {version or '(latest)'} not ready")
        config = await client.get_model_config(name, version, as_json=True, client_timeout=timeout)
        metadata = await client.get_model_metadata(
            name, version, as_json=True, client_timeout=timeout
        )
        model_config = config.get("config", config)
        contract = _check_contract(name, model_config, metadata)

        size = contract.image_size
        probe = grpcclient.InferInput(INPUT_NAME, [1, size, size, 3], "UINT8")
        probe.set_data_from_numpy(np.zeros((1, size, size, 3), dtype=np.uint8))
        result = await client.infer(
            name,
            [probe],
            version,
            outputs=[
                grpcclient.InferRequestedOutput(OUTPUT_NAME, class_count=contract.num_classes)
            ],
            client_timeout=timeout,
        )
        entries = result.as_numpy(OUTPUT_NAME)
        if entries is None or entries.shape != (1, contract.num_classes):
            raise ModelContractError(
                f"model {name!r}: the classification request returned "
                f"{None if entries is None else entries.shape}, "
                f"expected (1, {contract.num_classes})"
            )
        labels = _parse_classification(name, list(entries[0]), contract.num_classes)
        served_version = str(result.get_response(as_json=True).get("model_version", version))
        return ModelInfo(
            name=name,
            version=served_version,
            image_size=size,
            max_batch_size=min(contract.max_batch_size, self._settings.max_batch_size),
            labels=labels,
            confidence_threshold=_recommended_threshold(name, model_config),
        )

    async def infer(self, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        """Probabilities `[B, C]` for `images` `[B, S, S, 3]` uint8; see the module docstring.

        One request per attempt, each with `triton.request_timeout_s`; outages are retried
        until `stop` is set. `ValueError` if `images` does not have the model's shape.
        """
        info = self.info
        size = info.image_size
        if (
            images.dtype != np.uint8
            or images.ndim != 4
            or images.shape[1:] != (size, size, 3)
            or not 1 <= images.shape[0] <= info.max_batch_size
        ):
            raise ValueError(
                f"expected uint8 images [B<={info.max_batch_size}, {size}, {size}, 3], got "
                f"{images.dtype} {images.shape}"
            )
        client = self._get_client()
        batch = images.shape[0]
        request = grpcclient.InferInput(INPUT_NAME, list(images.shape), "UINT8")
        request.set_data_from_numpy(images)
        outputs = [grpcclient.InferRequestedOutput(OUTPUT_NAME)]
        attempt = 0
        while True:
            try:
                result = await client.infer(
                    info.name,
                    [request],
                    self._settings.model_version,
                    outputs=outputs,
                    client_timeout=self._settings.request_timeout_s,
                )
            except (InferenceServerException, OSError, TimeoutError) as exc:
                if not _is_outage(exc):
                    raise ModelContractError(
                        f"Triton refused a batch of {batch} for model {info.name!r}: {exc}"
                    ) from exc
                failure: BaseException = exc
            else:
                probabilities = self._check_response(result, batch)
                self._metrics.model_ready.set(1)
                if self._failing:
                    self._failing = False
                    LOGGER.info("Triton answers again", extra={"retries": attempt})
                return probabilities

            self._metrics.model_ready.set(0)
            if not self._failing:
                self._failing = True
                LOGGER.warning("Triton inference failed, retrying", extra={"error": str(failure)})
            if self._stop.is_set():
                raise InferenceUnavailableError(
                    f"Triton inference failed and the service is stopping: {failure}"
                ) from failure
            self._retries.inc()
            if await wait_or_stop(self._stop, self._backoff.delay_s(attempt)):
                raise InferenceUnavailableError(
                    f"Triton inference failed and the service is stopping: {failure}"
                ) from failure
            attempt += 1

    def _check_response(self, result: InferResultLike, batch: int) -> npt.NDArray[np.float32]:
        info = self.info
        probabilities = result.as_numpy(OUTPUT_NAME)
        expected = (batch, len(info.labels))
        if probabilities is None:
            raise ModelContractError(f"model {info.name!r} returned no {OUTPUT_NAME!r} output")
        if probabilities.shape != expected or probabilities.dtype != np.float32:
            raise ModelContractError(
                f"model {info.name!r} returned {OUTPUT_NAME!r} {probabilities.dtype} "
                f"{probabilities.shape}; expected float32 {expected}"
            )
        return probabilities

    async def ready(self) -> bool:
        """True when connect() succeeded and Triton says server and model are ready now.

        Updates the model_ready gauge; never raises for an unreachable Triton.
        """
        if self._info is None:
            return False
        client = self._get_client()
        timeout = self._settings.request_timeout_s
        try:
            is_ready = await client.is_server_ready(client_timeout=timeout) and (
                await client.is_model_ready(
                    self._info.name, self._settings.model_version, client_timeout=timeout
                )
            )
        except (InferenceServerException, OSError, TimeoutError) as exc:
            LOGGER.debug("readiness check failed", extra={"error": str(exc)})
            is_ready = False
        self._metrics.model_ready.set(1 if is_ready else 0)
        return bool(is_ready)

    async def aclose(self) -> None:
        """Close the gRPC client. In-flight calls fail; call it after the Batcher drained."""
        if self._client is not None:
            await self._client.close()
