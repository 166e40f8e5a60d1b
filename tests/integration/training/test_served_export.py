"""The training workflow's export, served by the real tritonserver (CPU repository).

prepare -> train -> evaluate -> export into a copy of the committed repositories, then the
real server loads the new version, and for every validation image it answers the
probabilities evaluate recorded: the numbers training prints are the numbers served. The
consumer reads the threshold evaluate recommended from the served model's config.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from category_suggester.infer import TritonClassifier
from category_suggester.metrics import Metrics
from category_suggester.settings import TritonSettings
from devstack.process import StackError, free_port
from devstack.triton import TritonServer
from training.data import Augment, read_manifest, serving_image
from training.evaluate import evaluate
from training.export import export
from training.prepare import prepare
from training.repository import COMMITTED_ROOT, MODEL_NAME
from training.synthetic import generate
from training.train import TrainConfig, train

pytestmark = pytest.mark.integration

SIZE = 64


@dataclass(frozen=True)
class Served:
    server: TritonServer
    version: int
    manifest: Path
    evaluation: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("served-training")
    raw = generate(root / "raw", per_class=8, seed=0)
    prepare(raw, root / "data", stored_size=80, progress=False)
    result = train(
        TrainConfig(
            manifest=root / "data",
            out=root / "run",
            epochs=1,
            batch_size=8,
            image_size=SIZE,
            weights="none",
            augment=Augment(crop_scale=(0.6, 1.0), hue=0.0),
            workers=0,
            progress=False,
        )
    )
    evaluation = evaluate(result.best_checkpoint, root / "data", root / "eval", progress=False)
    repo_root = root / "model_repository"
    shutil.copytree(
        COMMITTED_ROOT, repo_root, ignore=lambda _d, names: [n for n in names if n.isdigit()]
    )
    exported = export(result.best_checkpoint, evaluation.out, repo_root=repo_root, kinds=("cpu",))
    server = TritonServer(
        repo_root / "cpu",
        root / "triton",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    try:
        server.start(timeout_s=120)
    except StackError as exc:
        pytest.fail(f"tritonserver could not serve the exported model: {exc}", pytrace=False)
    yield Served(server, exported.version, root / "data", evaluation.out)
    server.stop()


def test_triton_serves_the_evaluated_probabilities(served: Served) -> None:
    with (served.evaluation / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = json.loads((served.evaluation / "report.json").read_text())["labels"]
    root = read_manifest(served.manifest).root
    images = np.stack(
        [serving_image(root / row["path"], SIZE).permute(1, 2, 0).numpy() for row in rows]
    )
    client = grpcclient.InferenceServerClient(served.server.grpc_url)
    try:
        assert client.is_model_ready(MODEL_NAME, str(served.version))
        tensor = grpcclient.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        result = client.infer(
            MODEL_NAME, [tensor], outputs=[grpcclient.InferRequestedOutput("probabilities")]
        )
        served_probabilities = result.as_numpy("probabilities")
        config = client.get_model_config(MODEL_NAME, as_json=True)["config"]
    finally:
        client.close()
    evaluated = np.array([[float(row[f"p_{name}"]) for name in labels] for row in rows])
    np.testing.assert_allclose(served_probabilities, evaluated, atol=1e-4)
    assert config["input"][0]["dims"] == [str(SIZE), str(SIZE), "3"]
    assert result.get_response().model_version == str(served.version)


async def test_the_consumer_reads_the_evaluated_threshold_from_triton(served: Served) -> None:
    recommended = json.loads((served.evaluation / "threshold.json").read_text())
    classifier = TritonClassifier(
        TritonSettings(url=served.server.grpc_url), Metrics(CollectorRegistry())
    )
    try:
        info = await classifier.connect()
    finally:
        await classifier.aclose()
    assert info.version == str(served.version)
    assert info.confidence_threshold == recommended["confidence_threshold"]
