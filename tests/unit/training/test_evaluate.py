"""evaluate: the metric functions on known numbers, and the files a real evaluation writes."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.unit.training.helpers import Trained
from training.data import read_manifest, write_manifest
from training.errors import DataError
from training.evaluate import (
    Evaluation,
    compute_metrics,
    confusion_text,
    evaluate,
    expected_calibration_error,
    recommend_threshold,
    sha256_file,
    threshold_table,
)
from training.model import BACKGROUND_LABEL

LABELS = ["books", "car", "mobile"]


def test_compute_metrics_on_known_predictions() -> None:
    probabilities = np.array(
        [
            [0.7, 0.2, 0.1],  # books -> books
            [0.6, 0.3, 0.1],  # books -> books
            [0.5, 0.4, 0.1],  # car -> books
            [0.1, 0.8, 0.1],  # car -> car
            [0.2, 0.2, 0.6],  # mobile -> mobile
        ]
    )
    targets = np.array([0, 0, 1, 1, 2])
    metrics = compute_metrics(probabilities, targets, LABELS, target_accuracy=0.9)
    assert metrics["images"] == 5
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [0, 0, 1]]
    books = metrics["per_class"]["books"]
    assert books["precision"] == pytest.approx(2 / 3)
    assert books["recall"] == pytest.approx(1.0)
    assert books["f1"] == pytest.approx(0.8)
    assert metrics["per_class"]["car"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2, "predicted": 1}
    )
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 1.0) / 3)
    expected_log_loss = -np.mean(np.log([0.7, 0.6, 0.4, 0.8, 0.6]))
    assert metrics["log_loss"] == pytest.approx(expected_log_loss)
    # Confidences 0.7, 0.6, 0.5 (wrong), 0.8, 0.6: at >= 0.6 four images, all right.
    assert metrics["recommended_threshold"] == pytest.approx(
        {"threshold": 0.6, "achieved": True, "target_accuracy": 0.9, "coverage": 0.8,
         "accuracy": 1.0}
    )  # fmt: skip


def test_log_loss_stays_finite_for_a_certain_mistake() -> None:
    metrics = compute_metrics(np.array([[1.0, 0.0, 0.0]]), np.array([1]), LABELS)
    assert math.isfinite(metrics["log_loss"])
    assert metrics["log_loss"] == pytest.approx(-math.log(1e-15))


def test_expected_calibration_error() -> None:
    confidence = np.array([0.8, 0.8, 0.8, 0.8, 1.0])
    correct = np.array([True, True, True, True, True])
    # Four at 0.8 that are always right: a gap of 0.2 on 4/5 of the images.
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.16)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([False, True])) == 0.0


def test_recommended_threshold_maximises_coverage_at_the_target() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.6])
    correct = np.array([True, True, False, True, False])
    got = recommend_threshold(confidence, correct, 0.75)
    assert got == pytest.approx(
        {"threshold": 0.8, "achieved": True, "target_accuracy": 0.75, "coverage": 0.8,
         "accuracy": 0.75}
    )  # fmt: skip
    assert recommend_threshold(confidence, correct, 1.0)["threshold"] == 0.95


def test_the_threshold_also_keeps_out_of_category_photos_below_it() -> None:
    confidence = np.array([0.99, 0.95, 0.9, 0.8, 0.6])
    correct = np.array([True, True, True, True, True])
    # Without OOD photos everything may be confident; with them the threshold must lie
    # above all but 5% of their confidences (here: none of the four may reach it).
    assert recommend_threshold(confidence, correct, 0.9)["threshold"] == 0.6
    ood = np.array([0.3, 0.85, 0.4, 0.2])
    got = recommend_threshold(confidence, correct, 0.9, ood_confidence=ood)
    # Covers 0.99, 0.95, 0.9; must leave out 0.85 (OOD): midway between 0.9 and 0.85.
    assert got["threshold"] == pytest.approx(0.875)
    assert got["coverage"] == 0.6
    assert got["ood_confident"] == 0.0
    # A quarter may be confident: 0.85 is allowed, 0.4 is not; 0.6 is the lowest photo.
    loose = recommend_threshold(confidence, correct, 0.9, ood_confidence=ood,
                                max_ood_confident=0.25)  # fmt: skip
    assert loose["threshold"] == pytest.approx(0.5)
    assert (loose["coverage"], loose["ood_confident"]) == (1.0, 0.25)
    # OOD photos more confident than every category photo: nothing can be confident.
    hopeless = recommend_threshold(confidence, correct, 0.9, ood_confidence=np.ones(4))
    assert (hopeless["achieved"], hopeless["threshold"]) == (False, 1.0)


def test_the_trade_off_table_has_the_out_of_category_share() -> None:
    rows = threshold_table(
        np.array([0.9, 0.5]),
        np.array([True, False]),
        thresholds=(0.0, 0.6),
        ood_confidence=np.array([0.7, 0.2, 0.3, 0.1]),
    )
    assert [row["ood_confident"] for row in rows] == [1.0, 0.25]
    assert [row["accuracy"] for row in rows] == [0.5, 1.0]


def test_out_of_category_photos_count_in_no_accuracy(trained: Trained, tmp_path: Path) -> None:
    """A background class in the manifest and an --ood folder: both are OOD photos."""
    source = read_manifest(trained.manifest)
    data = tmp_path / "data"
    samples = [s for s in source.samples if s.split == "val"]
    books = source.labels.index("books")
    # The books photos become out_of_category photos of a manifest with that class.
    labels = [*source.labels, BACKGROUND_LABEL]
    relabelled = [
        replace(s, label=len(source.labels) if s.label == books else s.label) for s in samples
    ]
    for s in relabelled:
        target = data / s.path.relative_to(source.root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(s.path)
    write_manifest(
        data, labels, [replace(s, path=data / s.path.relative_to(source.root)) for s in relabelled]
    )
    ood = tmp_path / "ood"
    ood.mkdir()
    for n, s in enumerate(samples[:3]):
        (ood / f"{n}.jpg").symlink_to(s.path)
    evaluation = evaluate(
        trained.result.best_checkpoint, data, tmp_path / "eval", ood=ood, progress=False
    )
    metrics = evaluation.report["metrics"]
    books_photos = sum(s.label == books for s in samples)
    assert metrics["images"] == len(samples) - books_photos
    assert metrics["ood_images"] == books_photos + 3
    assert metrics["per_class"]["books"]["support"] == 0
    with (tmp_path / "eval" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sum(row["label"] == BACKGROUND_LABEL for row in rows) == books_photos + 3
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "OOD confident |" in summary


def test_a_threshold_covers_all_ties_and_may_be_unreachable() -> None:
    # 0.9 twice, one right and one wrong: no cut separates them, so 100% is out of reach.
    confidence = np.array([0.9, 0.9, 0.8])
    correct = np.array([True, False, True])
    got = recommend_threshold(confidence, correct, 1.0)
    assert got["achieved"] is False
    assert got["threshold"] == 1.0
    assert got["coverage"] == 0.0


def test_threshold_table_rows() -> None:
    confidence = np.array([0.99, 0.7, 0.4])
    correct = np.array([True, False, True])
    rows = threshold_table(confidence, correct, thresholds=(0.0, 0.5, 0.995))
    assert rows == [
        {"threshold": 0.0, "coverage": 1.0, "covered": 3, "accuracy": pytest.approx(2 / 3)},
        {"threshold": 0.5, "coverage": 2 / 3, "covered": 2, "accuracy": 0.5},
        {"threshold": 0.995, "coverage": 0.0, "covered": 0, "accuracy": None},
    ]


def test_confusion_text_is_aligned() -> None:
    text = confusion_text([[12, 0], [3, 100]], ["books", "car"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[2].split() == ["car", "3", "100"]


def test_evaluation_writes_every_output_and_predictions_reproduce_it(
    trained: Trained, evaluated: Evaluation
) -> None:
    out = evaluated.out
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert report["checkpoint_sha256"] == sha256_file(trained.result.best_checkpoint)
    assert metrics["accuracy"] == pytest.approx(trained.result.best_val_accuracy)
    assert metrics["images"] == 50  # 30% of 32 per class: 10 validation images each

    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = report["labels"]
    assert len(rows) == metrics["images"]
    recomputed = sum(row["label"] == row["predicted"] for row in rows) / len(rows)
    assert recomputed == pytest.approx(metrics["accuracy"])
    confusion = [[0] * len(labels) for _ in labels]
    for row in rows:
        confusion[labels.index(row["label"])][labels.index(row["predicted"])] += 1
        probabilities = [float(row[f"p_{name}"]) for name in labels]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert float(row["confidence"]) == pytest.approx(max(probabilities))
    assert confusion == metrics["confusion_matrix"]
    assert all((trained.manifest / row["path"]).is_file() for row in rows)

    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["confidence_threshold"] == metrics["recommended_threshold"]["threshold"]
    assert threshold["target_accuracy"] == 0.95
    assert threshold["checkpoint_sha256"] == report["checkpoint_sha256"]
    summary = (out / "summary.md").read_text()
    assert f"{metrics['accuracy']:.4f}" in summary
    assert "| motorcycle |" in summary
    assert (out / "confusion_matrix.txt").read_text().startswith("true \\ pred")
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_a_manifest_of_other_labels(trained: Trained, tmp_path: Path) -> None:
    manifest = tmp_path / "data"
    manifest.mkdir()
    (manifest / "labels.txt").write_text("a\nb\n")
    (manifest / "manifest.csv").write_text(
        f"path,label,split,sha256,source\n{next(trained.manifest.rglob('*.jpg'))},a,val,x,y\n"
    )
    with pytest.raises(DataError, match="labels"):
        evaluate(trained.result.best_checkpoint, manifest, tmp_path / "eval", progress=False)
