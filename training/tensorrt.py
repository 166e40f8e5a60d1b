"""TensorRT: a version's ONNX file -> an FP16 TensorRT plan that the GPU repository serves.

Takes the GPU repository and a version (the latest by default). On a machine with a CUDA
GPU and the `tensorrt` Python package, parses `<version>/model.onnx`, builds an engine
with the FP16 flag and one optimisation profile for the dynamic batch dimension
(min 1, opt = max = max_batch_size), checks it against onnxruntime on the same images,
writes `<version>/model.plan` beside the ONNX file and switches the model's `config.pbtxt`
to the `tensorrt_plan` platform (training.repository's render_config, kind "gpu-plan"),
with the same name, I/O, batching and warm-up, and the version's recommended
`confidence_threshold` when its threshold.json is there. Returns a `PlanResult`.

A plan only runs on the GPU model and TensorRT version that built it, so this runs on the
serving machine (or one just like it). The ONNX file stays in the version: the next
`export` writes a new version and renders the ONNX Runtime config again, after which the
plan is built anew for that version.

Raises `NoGPUError` where no CUDA GPU is visible (checked first, before anything is read),
`TrainingError` when the `tensorrt` package is missing, the ONNX file cannot be parsed,
the version's threshold.json is unreadable or the build fails, `ParityError` when the
engine disagrees with onnxruntime beyond `atol`, and `VersionExistsError`
rather than replace an existing plan (unless `force`).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import numpy as np
import onnxruntime as ort
import torch

from training.errors import NoGPUError, ParityError, TrainingError, VersionExistsError
from training.evaluate import THRESHOLD_NAME
from training.model import INPUT_NAME, OUTPUT_NAME, read_labels, read_onnx_contract
from training.repository import (
    CONFIG_FILE,
    DEFAULT_MAX_BATCH_SIZE,
    LABELS_FILE,
    latest_version,
    model_dir,
    render_config,
    threshold_parameters,
)

log = logging.getLogger(__name__)

PLAN_NAME: Final = "model.plan"
DEFAULT_WORKSPACE_BYTES: Final = 4 << 30
# FP16 engines differ from the FP32 graph by a few thousandths on a probability; more
# than this means a broken build, not rounding.
DEFAULT_PLAN_ATOL: Final = 0.03
_PARITY_IMAGES: Final = 8


@dataclass(frozen=True)
class PlanResult:
    plan: Path
    config: Path
    version: int
    max_batch_size: int
    max_abs_diff: float


def require_gpu() -> None:
    """Raise NoGPUError unless a CUDA GPU is visible to this process."""
    if not torch.cuda.is_available():
        raise NoGPUError(
            "no CUDA GPU is visible on this machine, and a TensorRT plan can only be built "
            "on one. Run this command on the GPU machine that will serve the model (plans "
            "are specific to the GPU model and the TensorRT version)."
        )


def import_tensorrt() -> ModuleType:
    """The `tensorrt` module; TrainingError with the fix when it is not installed."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TrainingError(
            "the `tensorrt` Python package is not installed: install the version of the "
            "TensorRT inside the Triton image that serves the plan (Triton 24.12: "
            "`pip install tensorrt==10.7.*`); a plan only loads in the TensorRT that built it"
        ) from exc


def configured_max_batch_size(config_path: Path) -> int:
    """`max_batch_size` of an existing config.pbtxt, or the repository default."""
    if config_path.is_file():
        found = re.search(r"^max_batch_size:\s*(\d+)", config_path.read_text(), re.MULTILINE)
        if found:
            return int(found.group(1))
    return DEFAULT_MAX_BATCH_SIZE


def build_plan(
    onnx_path: Path,
    *,
    image_size: int,
    max_batch_size: int,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    trt: Any = None,
) -> bytes:
    """Parse `onnx_path` and build a serialized FP16 engine with a dynamic batch profile.

    `trt` is the tensorrt module, imported when not given (its API is untyped).
    """
    trt = trt or import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # TensorRT 8 needs explicit batch asked for; TensorRT 10 always has it and ignores it.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None:
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # From the file, not bytes: the parser then finds external weight files beside it.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TrainingError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)}")
    fp16 = getattr(trt.BuilderFlag, "FP16", None)
    if fp16 is None:
        raise TrainingError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no FP16 builder flag (TensorRT 11 "
            "removed it); install the TensorRT 10 of the Triton image (24.12: "
            "`pip install tensorrt==10.7.*`)"
        )
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not getattr(builder, "platform_has_fast_fp16", True):
        log.warning("this GPU has no fast FP16; the FP16 plan may be slower than expected")
    config.set_flag(fp16)
    profile = builder.create_optimization_profile()
    one = (1, image_size, image_size, 3)
    full = (max_batch_size, image_size, image_size, 3)
    profile.set_shape(INPUT_NAME, one, full, full)
    config.add_optimization_profile(profile)
    log.info(
        "building the TensorRT FP16 engine (batch 1..%d, %dx%d px); this takes minutes",
        max_batch_size,
        image_size,
        image_size,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrainingError(f"TensorRT could not build an engine from {onnx_path} (see its log)")
    return bytes(serialized)


def run_plan(plan: bytes, images: np.ndarray[Any, Any], num_classes: int, trt: ModuleType) -> Any:
    """Probabilities of the engine for uint8 NHWC `images` (at most its max batch)."""
    logger = trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise TrainingError("TensorRT could not load the plan it just built")
    if engine.get_tensor_dtype(OUTPUT_NAME) != trt.float32:
        raise TrainingError(f"the plan's {OUTPUT_NAME!r} is not FP32, the contract's type")
    context = engine.create_execution_context()
    device = torch.device("cuda")
    inputs = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    outputs = torch.empty((len(images), num_classes), dtype=torch.float32, device=device)
    context.set_input_shape(INPUT_NAME, tuple(inputs.shape))
    context.set_tensor_address(INPUT_NAME, inputs.data_ptr())
    context.set_tensor_address(OUTPUT_NAME, outputs.data_ptr())
    stream = torch.cuda.current_stream(device)
    if not context.execute_async_v3(stream.cuda_stream):
        raise TrainingError("TensorRT failed to run the plan")
    stream.synchronize()
    return outputs.cpu().numpy()


def build_into_repository(
    repo_root: Path,
    *,
    version: int | None = None,
    max_batch_size: int | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    atol: float = DEFAULT_PLAN_ATOL,
    force: bool = False,
) -> PlanResult:
    """Build the plan of a GPU repository version and serve it (see the module docstring)."""
    require_gpu()
    trt = import_tensorrt()
    directory = model_dir(repo_root, "gpu")
    number = version if version is not None else latest_version(repo_root, "gpu")
    if number is None:
        raise TrainingError(f"{directory} has no version; run `python -m training export` first")
    version_dir = directory / str(number)
    onnx_path = version_dir / "model.onnx"
    if not onnx_path.is_file():
        raise TrainingError(f"{onnx_path} does not exist")
    plan_path = version_dir / PLAN_NAME
    if plan_path.exists() and not force:
        raise VersionExistsError(f"{plan_path} exists; pass --force to rebuild it")
    contract = read_onnx_contract(onnx_path)
    labels = read_labels(directory / LABELS_FILE)
    if len(labels) != contract.num_classes:
        raise TrainingError(
            f"{directory / LABELS_FILE} names {len(labels)} classes, the model has "
            f"{contract.num_classes}"
        )
    batch = max_batch_size or configured_max_batch_size(directory / CONFIG_FILE)
    parameters = _version_parameters(version_dir)

    plan = build_plan(
        onnx_path,
        image_size=contract.image_size,
        max_batch_size=batch,
        workspace_bytes=workspace_bytes,
        trt=trt,
    )
    images = np.random.default_rng(0).integers(
        0, 256, (min(_PARITY_IMAGES, batch), contract.image_size, contract.image_size, 3),
        dtype=np.uint8,
    )  # fmt: skip
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    got = run_plan(plan, images, contract.num_classes, trt)
    worst = float(np.max(np.abs(got - expected)))
    if not worst <= atol:
        raise ParityError(f"the TensorRT plan and the ONNX model differ by {worst:.3g} > {atol}")
    log.info("plan parity with onnxruntime: max |diff| %.2e on %d images", worst, len(images))

    _write_atomically(plan_path, plan)
    config_path = directory / CONFIG_FILE
    _write_atomically(
        config_path,
        render_config(
            "gpu-plan",
            num_classes=contract.num_classes,
            image_size=contract.image_size,
            max_batch_size=batch,
            parameters=parameters,
        ).encode(),
    )
    log.info("wrote %s and switched %s to the TensorRT plan", plan_path, config_path)
    return PlanResult(
        plan=plan_path, config=config_path, version=number, max_batch_size=batch, max_abs_diff=worst
    )


def _version_parameters(version_dir: Path) -> dict[str, str] | None:
    """The version's recommended threshold as config parameters; None without threshold.json.

    Read before the build (minutes), so that a broken file fails fast.
    """
    threshold_file = version_dir / THRESHOLD_NAME
    if not threshold_file.is_file():
        log.warning("%s is missing: the plan's config recommends no threshold", threshold_file)
        return None
    try:
        return threshold_parameters(threshold_file)
    except (OSError, ValueError) as exc:
        raise TrainingError(f"cannot read the version's threshold: {exc}") from exc


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    finally:
        Path(tmp).unlink(missing_ok=True)
