"""tensorrt: refuses without a GPU; the builder is asked for FP16 and the batch profile.

No GPU is needed: the no-GPU path is the real one here, and the builder calls are checked
against a stand-in of the `tensorrt` module that records them (the real build needs a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from training.__main__ import main
from training.errors import NoGPUError, TrainingError
from training.repository import render_config
from training.tensorrt import (
    _version_parameters,
    build_into_repository,
    build_plan,
    configured_max_batch_size,
    require_gpu,
)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.usefixtures("no_gpu")
def test_without_a_gpu_the_command_says_so_and_exits_non_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["tensorrt", "--repository", str(tmp_path / "nothing"), "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err
    assert "Traceback" not in err
    with pytest.raises(NoGPUError):
        require_gpu()
    with pytest.raises(NoGPUError):
        build_into_repository(tmp_path)


class FakeTensorRT:
    """Enough of the tensorrt 10 module to record what build_plan asks of it."""

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    NetworkDefinitionCreationFlag = SimpleNamespace()  # TensorRT 10: explicit batch only
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(FP16="fp16")

    def __init__(self, *, parses: bool = True, builds: bool = True) -> None:
        self.calls: list[tuple[Any, ...]] = []
        fake = self

        class Profile:
            def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
                fake.calls.append(("set_shape", name, *shapes))

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls.append(("pool", pool, size))

            def set_flag(self, flag: str) -> None:
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, profile: Profile) -> None:
                fake.calls.append(("add_profile",))

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: Any) -> None:
                pass

            def create_network(self, flags: int) -> str:
                fake.calls.append(("network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: str, config: Config) -> bytes | None:
                fake.calls.append(("build", network))
                return b"PLAN" if builds else None

        class OnnxParser:
            num_errors = 0 if parses else 1

            def __init__(self, network: str, logger: Any) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls.append(("parse", path))
                return parses

            def get_error(self, index: int) -> str:
                return "Unsupported operator Foo"

        self.Builder = Builder
        self.OnnxParser = OnnxParser


def test_build_plan_asks_for_fp16_and_a_dynamic_batch_profile(tmp_path: Path) -> None:
    trt = FakeTensorRT()
    plan = build_plan(
        tmp_path / "model.onnx",
        image_size=112,
        max_batch_size=64,
        workspace_bytes=1 << 30,
        trt=trt,
    )
    assert plan == b"PLAN"
    assert trt.calls == [
        ("network", 0),
        ("parse", str(tmp_path / "model.onnx")),
        ("pool", "workspace", 1 << 30),
        ("flag", "fp16"),
        ("set_shape", "image", (1, 112, 112, 3), (64, 112, 112, 3), (64, 112, 112, 3)),
        ("add_profile",),
        ("build", "network"),
    ]


def test_build_plan_reports_parser_and_builder_failures(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="Unsupported operator Foo"):
        build_plan(
            tmp_path / "m.onnx", image_size=112, max_batch_size=8, trt=FakeTensorRT(parses=False)
        )
    with pytest.raises(TrainingError, match="could not build"):
        build_plan(
            tmp_path / "m.onnx", image_size=112, max_batch_size=8, trt=FakeTensorRT(builds=False)
        )


def test_a_tensorrt_without_the_fp16_flag_is_refused(tmp_path: Path) -> None:
    trt = FakeTensorRT()
    trt.BuilderFlag = SimpleNamespace()  # TensorRT 11 removed the precision flags
    with pytest.raises(TrainingError, match="no FP16 builder flag"):
        build_plan(tmp_path / "m.onnx", image_size=112, max_batch_size=8, trt=trt)


def test_plan_config_keeps_the_contract_of_the_onnx_config() -> None:
    plan = render_config("gpu-plan", num_classes=5, image_size=224, max_batch_size=32)
    onnx = render_config("gpu", num_classes=5, image_size=224, max_batch_size=32)
    assert 'platform: "tensorrt_plan"' in plan
    assert "onnxruntime" not in plan
    assert "execution_accelerators" not in plan
    for line in (
        'name: "category_classifier"',
        "max_batch_size: 32",
        'name: "image"',
        "data_type: TYPE_UINT8",
        "dims: [ 224, 224, 3 ]",
        'name: "probabilities"',
        "data_type: TYPE_FP32",
        "dims: [ 5 ]",
        'label_filename: "labels.txt"',
        "kind: KIND_GPU",
        "preferred_batch_size: [ 32 ]",
    ):
        assert line in plan
        assert line in onnx
    # Everything after the ONNX config's accelerator block is the plan config's too.
    assert onnx.split("# The engine is built while loading")[1].split("\n", 1)[1] in plan


def test_plan_config_carries_the_recommended_threshold() -> None:
    parameters = {"confidence_threshold": "0.8125"}
    plan = render_config("gpu-plan", parameters=parameters)
    onnx = render_config("gpu", parameters=parameters)
    block = 'parameters {\n  key: "confidence_threshold"\n  value: { string_value: "0.8125" }\n}\n'
    assert plan.endswith(block)
    assert onnx.endswith(block)


def test_max_batch_size_comes_from_the_served_config(tmp_path: Path) -> None:
    config = tmp_path / "config.pbtxt"
    config.write_text(render_config("gpu", max_batch_size=48))
    assert configured_max_batch_size(config) == 48
    assert configured_max_batch_size(tmp_path / "missing.pbtxt") == 64


def test_the_plan_config_takes_the_threshold_of_its_version(tmp_path: Path) -> None:
    assert _version_parameters(tmp_path) is None
    (tmp_path / "threshold.json").write_text(json.dumps({"confidence_threshold": 0.8125}))
    assert _version_parameters(tmp_path) == {"confidence_threshold": "0.8125"}
    (tmp_path / "threshold.json").write_text(json.dumps({"confidence_threshold": 1.5}))
    with pytest.raises(TrainingError, match=r"in \[0, 1\]"):
        _version_parameters(tmp_path)
