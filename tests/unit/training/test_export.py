"""export: parity before writing, the same new version in both repositories, never overwrite."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from torch import nn
from tritonclient.grpc import model_config_pb2

import training.export as export_module
from tests.unit.training.helpers import IMAGE_SIZE, Trained
from training.data import read_manifest, serving_image
from training.errors import DataError, ParityError, VersionExistsError
from training.evaluate import Evaluation
from training.export import export
from training.model import export_onnx
from training.repository import KINDS, model_dir


def _versions(repo: Path) -> dict[str, list[str]]:
    return {
        kind: sorted(p.name for p in model_dir(repo, kind).iterdir() if p.name.isdigit())
        for kind in KINDS
        if model_dir(repo, kind).is_dir()
    }


@pytest.fixture(scope="module")
def exported(
    trained: Trained, evaluated: Evaluation, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, export_module.ExportResult]:
    repo = tmp_path_factory.mktemp("repository")
    # The GPU repository is ahead (a version built elsewhere): both get the next number.
    (model_dir(repo, "gpu") / "2").mkdir(parents=True)
    result = export(trained.result.best_checkpoint, evaluated.out, repo_root=repo)
    return repo, result


def test_export_writes_the_same_new_version_into_both_repositories(
    exported: tuple[Path, export_module.ExportResult], evaluated: Evaluation
) -> None:
    repo, result = exported
    assert result.version == 3
    assert _versions(repo) == {"cpu": ["3"], "gpu": ["2", "3"]}
    assert result.max_abs_diff <= 1e-4
    assert result.parity_images == 16 + 4
    for kind in KINDS:
        model = model_dir(repo, kind)
        version = model / "3"
        names = {p.name for p in version.iterdir()}
        assert {"model.onnx", "labels.txt", "report.json", "summary.md", "threshold.json"} <= names
        assert (version / "threshold.json").read_bytes() == (
            evaluated.out / "threshold.json"
        ).read_bytes()
        assert (model / "labels.txt").read_text().split()[0] == "books"
        config = (model / "config.pbtxt").read_text()
        assert f"dims: [ {IMAGE_SIZE}, {IMAGE_SIZE}, 3 ]" in config
        # The consumer reads the recommended threshold from Triton's model config.
        recommended = json.loads((evaluated.out / "threshold.json").read_text())
        served = text_format.Parse(config, model_config_pb2.ModelConfig()).parameters
        assert (
            float(served["confidence_threshold"].string_value)
            == (recommended["confidence_threshold"])
        )
    assert (model_dir(repo, "cpu") / "3" / "model.py").is_file()


def test_the_exported_file_gives_the_evaluated_probabilities(
    exported: tuple[Path, export_module.ExportResult], trained: Trained, evaluated: Evaluation
) -> None:
    """What Triton will serve is what evaluate measured: same pixels in, same numbers out."""
    repo, result = exported
    with (evaluated.out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = json.loads((evaluated.out / "report.json").read_text())["labels"]
    manifest = read_manifest(trained.manifest)
    images = np.stack(
        [
            serving_image(manifest.root / row["path"], IMAGE_SIZE).permute(1, 2, 0).numpy()
            for row in rows
        ]
    )
    session = ort.InferenceSession(
        str(model_dir(repo, "gpu") / str(result.version) / "model.onnx"),
        providers=["CPUExecutionProvider"],
    )
    served = session.run(["probabilities"], {"image": images})[0]
    evaluated_probabilities = np.array([[float(row[f"p_{n}"]) for n in labels] for row in rows])
    np.testing.assert_allclose(served, evaluated_probabilities, atol=1e-4)


def test_export_never_overwrites_a_version(
    exported: tuple[Path, export_module.ExportResult], trained: Trained, evaluated: Evaluation
) -> None:
    repo, _ = exported
    before = _versions(repo)
    config = (model_dir(repo, "cpu") / "config.pbtxt").read_text()
    with pytest.raises(VersionExistsError, match="never overwritten"):
        export(trained.result.best_checkpoint, evaluated.out, repo_root=repo, version=3)
    with pytest.raises(VersionExistsError):
        export(trained.result.best_checkpoint, evaluated.out, repo_root=repo, version=2)
    assert _versions(repo) == before
    assert (model_dir(repo, "cpu") / "config.pbtxt").read_text() == config


def test_export_refuses_an_evaluation_of_another_checkpoint(
    trained: Trained, evaluated: Evaluation, tmp_path: Path
) -> None:
    other = tmp_path / "other.pt"
    state = torch.load(trained.result.best_checkpoint, weights_only=True)
    state["epoch"] = 99
    torch.save(state, other)
    with pytest.raises(DataError, match="another checkpoint"):
        export(other, evaluated.out, repo_root=tmp_path / "repo")
    with pytest.raises(DataError, match="run `python -m training evaluate`"):
        export(trained.result.best_checkpoint, tmp_path / "no-eval", repo_root=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_export_refuses_an_evaluation_without_a_usable_threshold(
    trained: Trained, evaluated: Evaluation, tmp_path: Path
) -> None:
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    for name in ("report.json", "summary.md", "threshold.json"):
        (evaluation / name).write_bytes((evaluated.out / name).read_bytes())
    (evaluation / "threshold.json").write_text(json.dumps({"confidence_threshold": None}))
    with pytest.raises(DataError, match="threshold"):
        export(trained.result.best_checkpoint, evaluation, repo_root=tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_a_parity_failure_writes_nothing(
    trained: Trained, evaluated: Evaluation, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = export_onnx

    def export_a_different_model(classifier: nn.Module, path: Path, **kwargs: int) -> None:
        # What a broken exporter would do: the file no longer computes the classifier.
        with torch.no_grad():
            original = classifier.fc.weight.clone()  # type: ignore[union-attr, operator]
            classifier.fc.weight.mul_(2.0)  # type: ignore[union-attr, operator]
            try:
                real_export(classifier, path, **kwargs)
            finally:
                classifier.fc.weight.copy_(original)  # type: ignore[union-attr, operator]

    monkeypatch.setattr("training.export.export_onnx", export_a_different_model)
    repo = tmp_path / "repo"
    with pytest.raises(ParityError, match="disagree"):
        export(trained.result.best_checkpoint, evaluated.out, repo_root=repo)
    assert _versions(repo) == {}
