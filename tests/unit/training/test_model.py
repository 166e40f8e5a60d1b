"""The model contract: the serving graph, its ONNX export, the repository configs and versions."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

from training.model import (
    DEFAULT_LABELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OnnxContractError,
    ServingModel,
    build_model,
    export_onnx,
    read_labels,
    read_onnx_contract,
    write_labels,
)
from training.repository import (
    COMMITTED_ROOT,
    KINDS,
    MODEL_NAME,
    add_version,
    bootstrap,
    committed_config,
    latest_version,
    model_dir,
    render_config,
    threshold_parameters,
)

NUM_CLASSES = len(DEFAULT_LABELS)
SIZE = 112


def calibrated_random_model(num_classes: int = NUM_CLASSES) -> nn.Module:
    """A random ResNet-34 whose BatchNorm statistics fit random images.

    With the default running statistics a random ResNet saturates its softmax (1.0 and
    ~0), which would make any comparison of outputs trivially pass.
    """
    torch.manual_seed(0)
    model = build_model(num_classes)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, SIZE, SIZE))
    return model.eval()


def random_images(batch: int, seed: int = 1) -> npt.NDArray[np.uint8]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(batch, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    return calibrated_random_model()


@pytest.fixture(scope="module")
def onnx_file(classifier: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export_onnx(classifier, path, image_size=SIZE)
    return path


def test_serving_model_returns_probabilities(classifier: nn.Module) -> None:
    images = torch.from_numpy(random_images(4))
    with torch.no_grad():
        probabilities = ServingModel(classifier).eval()(images)
    assert probabilities.shape == (4, NUM_CLASSES)
    assert probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(4))
    assert not torch.allclose(probabilities[:, 0], torch.ones(4)), "softmax saturated"


def test_serving_model_scales_and_normalises_inside(classifier: nn.Module) -> None:
    images = random_images(2)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(classifier((pixels - mean) / std), dim=1)
        actual = ServingModel(classifier).eval()(torch.from_numpy(images))
    torch.testing.assert_close(actual, expected)
    assert set(ServingModel(classifier).state_dict()) == {
        f"classifier.{key}" for key in classifier.state_dict()
    }


def test_onnx_export_has_the_exact_contract(onnx_file: Path) -> None:
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model, full_check=True)
    (image,) = model.graph.input
    (probabilities,) = model.graph.output
    assert image.name == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    batch, *rest = image.type.tensor_type.shape.dim
    assert batch.dim_param, "the batch dimension must be dynamic"
    assert [d.dim_value for d in rest] == [SIZE, SIZE, 3]
    assert probabilities.name == "probabilities"
    assert probabilities.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    out_batch, classes = probabilities.type.tensor_type.shape.dim
    assert out_batch.dim_param
    assert classes.dim_value == NUM_CLASSES
    # One self-contained file: Triton copies the version directory, not side files.
    assert not any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )
    assert read_onnx_contract(onnx_file).image_size == SIZE


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_onnxruntime_matches_pytorch(classifier: nn.Module, onnx_file: Path, batch: int) -> None:
    images = random_images(batch, seed=batch)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["probabilities"], {"image": images})
    with torch.no_grad():
        torch_out = ServingModel(classifier).eval()(torch.from_numpy(images)).numpy()
    assert onnx_out.shape == (batch, NUM_CLASSES)
    assert onnx_out.dtype == np.float32
    assert np.abs(onnx_out - torch_out).max() <= 1e-4


def test_export_keeps_the_classifier_mode(tmp_path: Path) -> None:
    # Any classifier fits the serving graph; a small one keeps the export quick.
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    tiny.train()
    export_onnx(tiny, tmp_path / "m.onnx", image_size=64)
    assert tiny.training
    contract = read_onnx_contract(tmp_path / "m.onnx")
    assert (contract.image_size, contract.num_classes) == (64, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").stat().st_mode & 0o777 == 0o644


def test_read_onnx_contract_refuses_other_io(tmp_path: Path) -> None:
    path = tmp_path / "other.onnx"
    torch.onnx.export(
        nn.Flatten().eval(),
        (torch.zeros(2, 3),),
        path,
        input_names=["x"],
        output_names=["y"],
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    with pytest.raises(OnnxContractError, match="expected"):
        read_onnx_contract(path)


def test_build_model_without_weights_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="training.model"):
        model = build_model(7)
    assert "RANDOMLY INITIALISED" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert model.fc.out_features == 7


@pytest.mark.parametrize("wrapped", [True, False])
def test_build_model_loads_our_checkpoints(tmp_path: Path, wrapped: bool) -> None:
    source = build_model(4)
    state = source.state_dict()
    checkpoint: dict[str, Any] = {"model_state": state, "epoch": 3} if wrapped else state
    torch.save(checkpoint, tmp_path / "best.pt")
    loaded = build_model(4, weights=tmp_path / "best.pt")
    for key, value in state.items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_build_model_refuses_a_checkpoint_of_another_shape(tmp_path: Path) -> None:
    torch.save({"model_state": build_model(4).state_dict()}, tmp_path / "best.pt")
    with pytest.raises(ValueError, match="does not fit"):
        build_model(5, weights=tmp_path / "best.pt")
    with pytest.raises(FileNotFoundError):
        build_model(5, weights=tmp_path / "missing.pt")


def test_build_model_imagenet_uses_torchvision_weights_and_a_new_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(1)
    pretrained = torchvision.models.resnet34(weights=None).state_dict()
    calls: list[dict[str, Any]] = []

    def get_state_dict(self: object, **kwargs: Any) -> dict[str, torch.Tensor]:
        # Stands in for the download only; the rest of torchvision's loading path runs.
        calls.append(kwargs)
        return pretrained

    weights_enum = torchvision.models.ResNet34_Weights
    monkeypatch.setattr(weights_enum, "get_state_dict", get_state_dict)
    model = build_model(5, weights="imagenet")
    assert len(calls) == 1
    assert calls[0]["check_hash"] is True
    torch.testing.assert_close(model.conv1.weight, pretrained["conv1.weight"])
    assert model.fc.out_features == 5


def test_labels_round_trip_and_refuse_ambiguity(tmp_path: Path) -> None:
    write_labels(tmp_path / "labels.txt", DEFAULT_LABELS)
    assert read_labels(tmp_path / "labels.txt") == list(DEFAULT_LABELS)
    with pytest.raises(ValueError, match="repeated"):
        write_labels(tmp_path / "x.txt", ["car", "car"])
    with pytest.raises(ValueError, match="padded"):
        write_labels(tmp_path / "x.txt", ["car ", "books"])


@pytest.mark.parametrize("kind", KINDS)
def test_committed_config_is_the_rendered_one(kind: str) -> None:
    directory = model_dir(COMMITTED_ROOT, kind)
    assert (directory / "config.pbtxt").read_text() == committed_config(kind)
    assert read_labels(directory / "labels.txt") == list(DEFAULT_LABELS)


def _parse(text: str) -> Any:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("kind", KINDS)
def test_configs_state_the_contract(kind: str) -> None:
    config = _parse(render_config(kind))
    assert config.name == MODEL_NAME
    (image,) = config.input
    assert (image.name, image.data_type, list(image.dims)) == (
        "image",
        model_config_pb2.TYPE_UINT8,
        [SIZE, SIZE, 3],
    )
    (probabilities,) = config.output
    assert (probabilities.name, probabilities.data_type, list(probabilities.dims)) == (
        "probabilities",
        model_config_pb2.TYPE_FP32,
        [NUM_CLASSES],
    )
    assert probabilities.label_filename == "labels.txt"
    assert config.max_batch_size == 64
    assert 0 < config.dynamic_batching.max_queue_delay_microseconds <= 5000
    assert all(size <= 64 for size in config.dynamic_batching.preferred_batch_size)
    (group,) = config.instance_group
    if kind == "gpu":
        assert config.backend == "onnxruntime"
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        (trt,) = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt"
        assert trt.parameters["precision_mode"] == "FP16"
        assert trt.parameters["trt_profile_max_shapes"] == f"image:64x{SIZE}x{SIZE}x3"
    else:
        assert config.backend == "python"
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.parameters["intra_op_thread_count"].string_value == "2"


def test_render_config_follows_the_model() -> None:
    gpu = _parse(render_config("gpu", num_classes=7, image_size=224, max_batch_size=16))
    assert list(gpu.input[0].dims) == [224, 224, 3]
    assert list(gpu.output[0].dims) == [7]
    assert list(gpu.dynamic_batching.preferred_batch_size) == []
    trt = gpu.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.parameters["trt_profile_opt_shapes"] == "image:16x224x224x3"
    assert list(gpu.model_warmup[0].inputs["image"].dims) == [224, 224, 3]
    cpu = _parse(render_config("cpu", num_classes=7, image_size=224, max_batch_size=16))
    assert list(cpu.dynamic_batching.preferred_batch_size) == [8, 16]


@pytest.mark.parametrize("kind", ["cpu", "gpu", "gpu-plan"])
def test_parameters_are_model_parameters_of_every_config(kind: Any) -> None:
    plain = render_config(kind)
    config = _parse(render_config(kind, parameters={"confidence_threshold": "0.8125"}))
    assert config.parameters["confidence_threshold"].string_value == "0.8125"
    expected = {"confidence_threshold"} | ({"intra_op_thread_count"} if kind == "cpu" else set())
    assert set(config.parameters) == expected
    # Without parameters nothing changes: the committed configs stay the rendered ones;
    # with them, nothing but the parameters changes.
    assert render_config(kind, parameters={}) == plain
    del config.parameters["confidence_threshold"]
    assert config == _parse(plain)


@pytest.mark.parametrize(
    "parameters",
    [{"confidence_threshold": 'a"b'}, {"bad key": "1"}, {"intra_op_thread_count": "4"}],
)
def test_render_config_refuses_parameters_it_cannot_write(parameters: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="parameter"):
        render_config("cpu", parameters=parameters)


def test_threshold_parameters_read_what_evaluate_wrote(tmp_path: Path) -> None:
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps({"confidence_threshold": 0.1 + 0.2, "achieved": True}))
    (value,) = threshold_parameters(path).values()
    assert float(value) == 0.1 + 0.2  # written to read back as the same float
    assert threshold_parameters(path) == {"confidence_threshold": repr(0.1 + 0.2)}
    for bad in ({"confidence_threshold": -0.1}, {"confidence_threshold": "0.5"}, {}, [0.5]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=r"number in \[0, 1\]"):
            threshold_parameters(path)


def test_add_version_writes_the_parameters_into_the_config(tmp_path: Path, onnx_file: Path) -> None:
    labels = list(DEFAULT_LABELS)
    add_version(tmp_path, "gpu", onnx_file, labels, image_size=SIZE)
    with pytest.raises(ValueError, match="parameter"):
        add_version(tmp_path, "gpu", onnx_file, labels, image_size=SIZE, parameters={"a b": "1"})
    assert latest_version(tmp_path, "gpu") == 1  # a bad parameter writes nothing
    parameters = {"confidence_threshold": "0.75"}
    add_version(tmp_path, "gpu", onnx_file, labels, image_size=SIZE, parameters=parameters)
    config = (model_dir(tmp_path, "gpu") / "config.pbtxt").read_text()
    assert config == render_config("gpu", parameters=parameters)


def test_add_version_numbers_versions_and_never_overwrites(tmp_path: Path, onnx_file: Path) -> None:
    assert latest_version(tmp_path, "cpu") is None
    labels = list(DEFAULT_LABELS)
    assert add_version(tmp_path, "cpu", onnx_file, labels, image_size=SIZE) == 1
    assert add_version(tmp_path, "cpu", onnx_file, labels, image_size=SIZE) == 2
    assert add_version(tmp_path, "gpu", onnx_file, labels, image_size=SIZE) == 1
    assert latest_version(tmp_path, "cpu") == 2

    cpu = model_dir(tmp_path, "cpu")
    assert sorted(p.name for p in (cpu / "2").iterdir()) == ["model.onnx", "model.py"]
    assert (cpu / "2" / "model.py").read_text() == (
        model_dir(COMMITTED_ROOT, "cpu") / "onnx_model.py"
    ).read_text()
    assert sorted(p.name for p in (model_dir(tmp_path, "gpu") / "1").iterdir()) == ["model.onnx"]
    for kind in KINDS:
        directory = model_dir(tmp_path, kind)
        assert (directory / "config.pbtxt").read_text() == render_config(kind)
        assert read_labels(directory / "labels.txt") == labels

    before = (cpu / "1" / "model.onnx").stat().st_mtime_ns
    with pytest.raises(FileExistsError):
        add_version(tmp_path, "cpu", onnx_file, labels, image_size=SIZE, version=1)
    assert (cpu / "1" / "model.onnx").stat().st_mtime_ns == before
    # Nothing staged is left beside the repositories.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu", "gpu"]


def test_add_version_refuses_a_model_that_disagrees(tmp_path: Path, onnx_file: Path) -> None:
    with pytest.raises(ValueError, match="labels"):
        add_version(tmp_path, "cpu", onnx_file, ["a", "b"], image_size=SIZE)
    with pytest.raises(ValueError, match="224"):
        add_version(tmp_path, "cpu", onnx_file, list(DEFAULT_LABELS), image_size=224)
    assert latest_version(tmp_path, "cpu") is None


def test_bootstrap_leaves_a_served_repository_alone(tmp_path: Path) -> None:
    (model_dir(tmp_path, "cpu") / "3").mkdir(parents=True)
    assert bootstrap(tmp_path) == {"cpu": 3, "gpu": None}
    assert sorted(p.name for p in model_dir(tmp_path, "cpu").iterdir()) == ["3"]


# The Python-backend model, run outside Triton with a stand-in for its utility module: the
# real server (tests/integration/devstack/test_triton.py) cannot send it a bad request,
# because Triton validates shapes first, so its error path is proven here.


class _Tensor:
    def __init__(self, name: str, array: npt.NDArray[Any]) -> None:
        self.name = name
        self.array = array

    def as_numpy(self) -> npt.NDArray[Any]:
        return self.array


class _Response:
    def __init__(self, output_tensors: list[_Tensor], error: Exception | None = None) -> None:
        self.output_tensors = output_tensors
        self.error = error


def _fake_pb_utils() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        Tensor=_Tensor,
        InferenceResponse=_Response,
        TritonError=RuntimeError,
        TritonModelException=RuntimeError,
        triton_string_to_numpy={"TYPE_UINT8": np.uint8}.__getitem__,
        get_input_tensor_by_name=lambda request, name: request.get(name),
    )


@pytest.fixture
def python_model(onnx_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    source = model_dir(COMMITTED_ROOT, "cpu") / "onnx_model.py"
    spec = importlib.util.spec_from_file_location("category_classifier_model", source)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").symlink_to(onnx_file)
    config = {
        "input": [{"name": "image", "data_type": "TYPE_UINT8", "dims": [SIZE, SIZE, 3]}],
        "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [NUM_CLASSES]}],
        "parameters": {"intra_op_thread_count": {"string_value": "1"}},
    }
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(tmp_path),
            "model_version": "1",
        }
    )
    yield model
    model.finalize()


def test_python_model_runs_all_requests_in_one_batch(python_model: Any, onnx_file: Path) -> None:
    batches = [random_images(n, seed=n) for n in (1, 3, 2)]
    bad = np.zeros((1, SIZE, SIZE, 4), dtype=np.uint8)
    runs: list[int] = []
    session = python_model._session

    class CountingSession:
        def run(self, names: list[str], feeds: dict[str, Any]) -> Any:
            runs.append(len(feeds["image"]))
            return session.run(names, feeds)

    python_model._session = CountingSession()
    requests = [{"image": _Tensor("image", b)} for b in batches]
    requests.insert(1, {"image": _Tensor("image", bad)})
    requests.append({})
    responses = python_model.execute(requests)

    assert runs == [6], "all valid requests in one onnxruntime run"
    assert len(responses) == len(requests)
    assert "expected uint8[n, 112, 112, 3]" in str(responses[1].error)
    assert "missing" in str(responses[-1].error)
    reference = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for response, images in zip([responses[0], *responses[2:4]], batches, strict=True):
        assert response.error is None
        (tensor,) = response.output_tensors
        assert tensor.name == "probabilities"
        (expected,) = reference.run(["probabilities"], {"image": images})
        np.testing.assert_allclose(tensor.array, expected, atol=1e-6)


def test_python_model_answers_a_failed_run_with_errors(python_model: Any) -> None:
    class FailingSession:
        def run(self, names: list[str], feeds: dict[str, Any]) -> Any:
            raise ort.capi.onnxruntime_pybind11_state.Fail("out of memory")

    python_model._session = FailingSession()
    responses = python_model.execute([{"image": _Tensor("image", random_images(1))}] * 2)
    assert [str(r.error) for r in responses] == ["Fail: out of memory"] * 2
