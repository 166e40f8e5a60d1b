"""The real tritonserver serving the CPU repository: contract, parity, batching, new versions.

The module starts its own server on free loopback ports over a repository in a temporary
folder (the committed configs plus one exported version), because one test adds a version.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from torch import nn

from devstack.process import StackError, free_port
from devstack.triton import TritonServer
from training.model import DEFAULT_LABELS, ServingModel, build_model, export_onnx
from training.repository import COMMITTED_ROOT, MODEL_NAME, add_version, latest_version

pytestmark = pytest.mark.integration

SIZE = 112
NUM_CLASSES = len(DEFAULT_LABELS)


@dataclass(frozen=True)
class Served:
    server: TritonServer
    repo_root: Path
    onnx_path: Path
    classifier: nn.Module


def _copy_committed_tree(destination: Path) -> None:
    """The committed configs, labels and model source; no version a local build left."""

    def ignore_versions(_directory: str, names: list[str]) -> list[str]:
        return [name for name in names if name.isdigit()]

    shutil.copytree(COMMITTED_ROOT, destination, ignore=ignore_versions)


def _calibrated_random_model() -> nn.Module:
    # Train-mode passes give BatchNorm statistics that fit random images; with the default
    # ones a random ResNet saturates its softmax and every comparison would pass trivially.
    torch.manual_seed(0)
    model = build_model(NUM_CLASSES)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("triton")
    repo_root = root / "model_repository"
    _copy_committed_tree(repo_root)
    classifier = _calibrated_random_model()
    onnx_path = root / "model.onnx"
    export_onnx(classifier, onnx_path, image_size=SIZE)
    add_version(repo_root, "cpu", onnx_path, list(DEFAULT_LABELS), image_size=SIZE)
    server = TritonServer(
        repo_root / "cpu",
        root / "state",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        poll_secs=1,
    )
    server.start(timeout_s=120)
    yield Served(server, repo_root, onnx_path, classifier)
    server.stop()
    assert not server.is_running()


@pytest.fixture
def client(served: Served) -> Iterator[grpcclient.InferenceServerClient]:
    triton = grpcclient.InferenceServerClient(served.server.grpc_url)
    yield triton
    triton.close()


def _images(batch: int, seed: int) -> npt.NDArray[np.uint8]:
    return np.random.default_rng(seed).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)


def _input(images: npt.NDArray[np.uint8]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


def _counters(served: Served) -> dict[str, float]:
    text = httpx.get(served.server.metrics_url).text
    counters = {}
    for name in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_request_success"):
        match = re.search(rf'^{name}{{model="{MODEL_NAME}",[^}}]*}} (\S+)$', text, re.MULTILINE)
        assert match, f"{name} missing from the metrics page"
        counters[name] = float(match.group(1))
    return counters


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_second_handle_sees_the_server_through_its_pid_file(served: Served) -> None:
    other = TritonServer(served.server.model_repository, served.server.state_dir)
    assert other.is_running()


def test_metadata_and_config_state_the_contract(
    served: Served, client: grpcclient.InferenceServerClient
) -> None:
    metadata = client.get_model_metadata(MODEL_NAME, as_json=True)
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "UINT8", "shape": ["-1", str(SIZE), str(SIZE), "3"]}
    ]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", str(NUM_CLASSES)]}
    ]
    config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    assert config["backend"] == "python"
    assert config["max_batch_size"] == 64
    assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) > 0
    assert config["output"][0]["label_filename"] == "labels.txt"

    # Triton's classification extension reads labels.txt: the labels are wired to outputs.
    result = client.infer(
        MODEL_NAME,
        [_input(_images(1, seed=3))],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=NUM_CLASSES)],
    )
    entries = [raw.decode() for raw in result.as_numpy("probabilities")[0]]
    assert sorted(entry.split(":")[2] for entry in entries) == sorted(DEFAULT_LABELS)


def test_triton_matches_onnxruntime_and_pytorch(
    served: Served, client: grpcclient.InferenceServerClient
) -> None:
    images = _images(8, seed=4)
    result = client.infer(MODEL_NAME, [_input(images)])
    served_out = result.as_numpy("probabilities")
    session = ort.InferenceSession(str(served.onnx_path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["probabilities"], {"image": images})
    with torch.no_grad():
        torch_out = ServingModel(served.classifier).eval()(torch.from_numpy(images)).numpy()
    assert served_out.shape == (8, NUM_CLASSES)
    assert served_out.dtype == np.float32
    assert np.abs(served_out - onnx_out).max() <= 1e-4
    assert np.abs(served_out - torch_out).max() <= 1e-4
    assert result.get_response().model_version == "1"


async def test_concurrent_single_image_requests_are_batched(served: Served) -> None:
    images = [_images(1, seed=100 + i) for i in range(32)]
    before = _counters(served)
    triton = grpcclient_aio.InferenceServerClient(served.server.grpc_url)
    try:
        results = await asyncio.gather(*(triton.infer(MODEL_NAME, [_input(x)]) for x in images))
    finally:
        await triton.close()
    session = ort.InferenceSession(str(served.onnx_path), providers=["CPUExecutionProvider"])
    for result, x in zip(results, images, strict=True):
        (expected,) = session.run(["probabilities"], {"image": x})
        assert np.abs(result.as_numpy("probabilities") - expected).max() <= 1e-4

    # Triton records statistics as it finishes a request, not before the client has its
    # answer, so wait for the counters to account for all 32.
    def counted() -> bool:
        return _counters(served)["nv_inference_count"] - before["nv_inference_count"] >= 32

    _wait_for(counted, 10, "Triton to count 32 inferences")
    after = _counters(served)
    inferences = after["nv_inference_count"] - before["nv_inference_count"]
    executions = after["nv_inference_exec_count"] - before["nv_inference_exec_count"]
    assert inferences == 32
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] == 32
    assert 1 <= executions < inferences, f"{executions} executions for 32 inferences"


def test_a_new_version_is_served_without_restart(
    served: Served, client: grpcclient.InferenceServerClient
) -> None:
    # As export writes it: a new version and a config that changes with it (the version's
    # recommended threshold), both picked up by polling.
    before = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    assert "confidence_threshold" not in before.get("parameters", {})
    version = add_version(
        served.repo_root,
        "cpu",
        served.onnx_path,
        list(DEFAULT_LABELS),
        image_size=SIZE,
        parameters={"confidence_threshold": "0.75"},
    )
    assert version == latest_version(served.repo_root, "cpu") == 2

    def serves_new_version() -> bool:
        config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
        return (
            bool(client.is_model_ready(MODEL_NAME, "2"))
            and not client.is_model_ready(MODEL_NAME, "1")
            and "confidence_threshold" in config.get("parameters", {})
        )

    _wait_for(serves_new_version, 60, "Triton to load version 2 with its config, retire 1")
    result = client.infer(MODEL_NAME, [_input(_images(2, seed=5))])
    assert result.get_response().model_version == "2"
    parameters = client.get_model_config(MODEL_NAME, as_json=True)["config"]["parameters"]
    # The JSON form clients read (category_suggester/infer.py): a string value per parameter.
    assert parameters["confidence_threshold"] == {"string_value": "0.75"}
    assert parameters["intra_op_thread_count"] == {"string_value": "2"}


def test_a_model_that_cannot_load_fails_start_with_the_reason(tmp_path: Path) -> None:
    repo_root = tmp_path / "model_repository"
    _copy_committed_tree(repo_root)
    version_dir = repo_root / "cpu" / MODEL_NAME / "1"
    version_dir.mkdir()
    shutil.copyfile(COMMITTED_ROOT / "cpu" / MODEL_NAME / "onnx_model.py", version_dir / "model.py")
    (version_dir / "model.onnx").write_bytes(b"not an onnx file")
    server = TritonServer(
        repo_root / "cpu",
        tmp_path / "state",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    with pytest.raises(StackError, match="exited") as failure:
        server.start(timeout_s=60)
    # The load error itself, not only the server's closing lines.
    assert "failed to load 'category_classifier'" in str(failure.value)
    assert "INVALID_PROTOBUF" in str(failure.value)
    assert not server.is_running()
