"""Evaluate: a checkpoint and a split of the manifest -> metrics, plots and a threshold.

Takes a checkpoint written by `train` and the manifest `prepare` wrote. Classifies the
split (validation by default) through `ServingModel`, the graph export serves: the
service's preprocessing, uint8 pixels in, probabilities out. The numbers are therefore
those of the served model. Writes into `out`:
- `report.json`: accuracy, per-class precision/recall/F1/support, macro averages, the
  confusion matrix, log loss, expected calibration error (ECE), the threshold table and
  the recommended threshold, with the checkpoint's SHA-256 so export can tell the report
  belongs to the model it ships;
- `summary.md`: the same in short, for people;
- `confusion_matrix.png` and `confusion_matrix.txt` (rows: true class, columns: predicted);
- `predictions.csv`: one row per image (path, sha256, label, predicted, confidence, correct,
  one probability per class), enough to recompute every number independently;
- `threshold.json`: the recommended confidence threshold for the consumer's `confident`
  flag: the lowest one that keeps accuracy >= `target_accuracy` on the images whose top
  probability reaches it (the largest coverage that meets the target).
Returns an `Evaluation`.

The metric functions (`compute_metrics`, `threshold_table`, `recommend_threshold`,
`expected_calibration_error`) are pure and work on arrays of probabilities and labels.

Raises `DataError` (no manifest or an empty split) and `CheckpointError`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from training.data import EpochSampler, ImageDataset, eval_transform, make_loader, read_manifest
from training.errors import DataError
from training.model import ServingModel
from training.train import Checkpoint, load_checkpoint, resolve_device

log = logging.getLogger(__name__)

REPORT_NAME: Final = "report.json"
SUMMARY_NAME: Final = "summary.md"
PREDICTIONS_NAME: Final = "predictions.csv"
THRESHOLD_NAME: Final = "threshold.json"
CONFUSION_PNG: Final = "confusion_matrix.png"
CONFUSION_TXT: Final = "confusion_matrix.txt"
DEFAULT_TARGET_ACCURACY: Final = 0.95
TABLE_THRESHOLDS: Final = (
    0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999,
)  # fmt: skip
ECE_BINS: Final = 15
# Probabilities are clipped before the log: one confidently wrong image must not make the
# mean infinite (the same convention as scikit-learn's log_loss).
_LOG_EPS: Final = 1e-15

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Evaluation:
    out: Path
    accuracy: float
    threshold: float
    threshold_achieved: bool
    report: dict[str, Any]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_calibration_error(
    confidence: FloatArray, correct: npt.NDArray[np.bool_], bins: int = ECE_BINS
) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - mean confidence|
    weighted by the bin's share of images."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 joins the first bin.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            gap = abs(float(correct[members].mean()) - float(confidence[members].mean()))
            total += gap * float(members.mean())
    return total


def threshold_table(
    confidence: FloatArray,
    correct: npt.NDArray[np.bool_],
    thresholds: Sequence[float] = TABLE_THRESHOLDS,
) -> list[dict[str, Any]]:
    """Per threshold t: the share of images with confidence >= t (coverage), how many, and
    the accuracy on them (None when none is covered)."""
    rows: list[dict[str, Any]] = []
    for t in thresholds:
        covered = confidence >= t
        count = int(covered.sum())
        rows.append(
            {
                "threshold": float(t),
                "coverage": count / len(confidence) if len(confidence) else 0.0,
                "covered": count,
                "accuracy": float(correct[covered].mean()) if count else None,
            }
        )
    return rows


def recommend_threshold(
    confidence: FloatArray, correct: npt.NDArray[np.bool_], target_accuracy: float
) -> dict[str, Any]:
    """The lowest confidence threshold whose covered images reach `target_accuracy`.

    Candidates are the observed confidences, so the answer is exact on this data. When no
    threshold reaches the target, the threshold is 1.0 (nothing is marked confident) and
    `achieved` is False.
    """
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    hits = np.cumsum(correct[order])
    counts = np.arange(1, len(sorted_conf) + 1)
    accuracy = hits / counts
    # Only the last of equal confidences is a real cut: a threshold covers all its ties.
    is_cut = np.append(sorted_conf[1:] != sorted_conf[:-1], True)
    meeting = np.flatnonzero(is_cut & (accuracy >= target_accuracy))
    if len(meeting) == 0:
        return {
            "threshold": 1.0,
            "achieved": False,
            "target_accuracy": target_accuracy,
            "coverage": float(np.mean(confidence >= 1.0)) if len(confidence) else 0.0,
            "accuracy": None,
        }
    cut = int(meeting[-1])
    return {
        "threshold": float(sorted_conf[cut]),
        "achieved": True,
        "target_accuracy": target_accuracy,
        "coverage": (cut + 1) / len(sorted_conf),
        "accuracy": float(accuracy[cut]),
    }


def compute_metrics(
    probabilities: FloatArray,
    targets: IntArray,
    labels: Sequence[str],
    *,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
) -> dict[str, Any]:
    """Every number of the report from `[N, C]` probabilities and `[N]` true class indices."""
    if probabilities.ndim != 2 or probabilities.shape != (len(targets), len(labels)):
        raise DataError(
            f"probabilities of shape {probabilities.shape} do not fit "
            f"{len(targets)} targets and {len(labels)} labels"
        )
    if len(targets) == 0:
        raise DataError("nothing to evaluate: no images")
    classes = len(labels)
    predicted = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    correct = predicted == targets
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (targets, predicted), 1)
    per_class: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(labels):
        tp = int(confusion[i, i])
        predicted_i = int(confusion[:, i].sum())
        support = int(confusion[i, :].sum())
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "predicted": predicted_i,
        }
    present = [name for name in labels if per_class[name]["support"]]
    p_true = probabilities[np.arange(len(targets)), targets]
    return {
        "images": len(targets),
        "accuracy": float(correct.mean()),
        "macro_precision": _mean(per_class[name]["precision"] for name in present),
        "macro_recall": _mean(per_class[name]["recall"] for name in present),
        "macro_f1": _mean(per_class[name]["f1"] for name in present),
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "log_loss": float(-np.mean(np.log(np.clip(p_true, _LOG_EPS, 1.0)))),
        "expected_calibration_error": expected_calibration_error(confidence, correct),
        "ece_bins": ECE_BINS,
        "threshold_table": threshold_table(confidence, correct),
        "recommended_threshold": recommend_threshold(confidence, correct, target_accuracy),
    }


def _mean(values: Any) -> float:
    items = [float(v) for v in values]
    return sum(items) / len(items) if items else 0.0


def confusion_text(confusion: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """The confusion matrix as an aligned table; rows are true classes, columns predicted."""
    corner = "true \\ pred"
    width = max(len(corner), *(len(name) for name in labels))
    cell = max(*(len(name) for name in labels), *(len(str(v)) for row in confusion for v in row))
    header = f"{corner:<{width}}  " + "  ".join(f"{n:>{cell}}" for n in labels)
    lines = [header]
    for name, row in zip(labels, confusion, strict=True):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path) -> None:
    """Write the confusion matrix as a PNG: counts in the cells, colour by row share."""
    matrix = np.asarray(confusion, dtype=np.float64)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = 2.0 + 0.9 * len(labels)
    figure = Figure(figsize=(size, size), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(labels)), labels=list(labels), rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels=list(labels))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(matrix):
        axes.text(
            col,
            row,
            f"{int(count)}",
            ha="center",
            va="center",
            color="white" if shares[row, col] > 0.5 else "black",
        )
    figure.savefig(path, dpi=120)


def summary_markdown(report: dict[str, Any]) -> str:
    """A short Markdown summary of a report."""
    metrics = report["metrics"]
    labels: list[str] = report["labels"]
    rec = metrics["recommended_threshold"]
    lines = [
        "# Evaluation",
        "",
        f"- checkpoint: `{report['checkpoint']}` (epoch {report['checkpoint_epoch']})",
        f"- split: {report['split']} ({metrics['images']} images), image size "
        f"{report['image_size']} px",
        f"- accuracy: **{metrics['accuracy']:.4f}**, macro F1 {metrics['macro_f1']:.4f}",
        f"- log loss {metrics['log_loss']:.4f}, expected calibration error "
        f"{metrics['expected_calibration_error']:.4f} ({metrics['ece_bins']} bins)",
    ]
    if rec["achieved"]:
        lines.append(
            f"- recommended confidence threshold **{rec['threshold']:.4f}**: accuracy "
            f"{rec['accuracy']:.4f} on the {rec['coverage']:.1%} of images it covers "
            f"(target {rec['target_accuracy']:.2f})"
        )
    else:
        lines.append(
            f"- no threshold reaches accuracy {rec['target_accuracy']:.2f}; the recommended "
            "threshold is 1.0 (nothing marked confident)"
        )
    lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in labels:
        row = metrics["per_class"][name]
        lines.append(
            f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
            f"| {row['support']} |"
        )
    lines += [
        "",
        "Confusion matrix (rows: true class, columns: predicted):",
        "",
        "```",
        confusion_text(metrics["confusion_matrix"], labels).rstrip(),
        "```",
        "",
        "| threshold | coverage | accuracy on covered |",
        "|---:|---:|---:|",
    ]
    for row in metrics["threshold_table"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        lines.append(f"| {row['threshold']:.3f} | {row['coverage']:.1%} | {accuracy} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def predict(
    ckpt: Checkpoint,
    manifest: Path,
    *,
    split: str = "val",
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> tuple[FloatArray, IntArray, list[str], list[str], list[str]]:
    """Probabilities of `ServingModel(ckpt.classifier)` on a split: (probabilities,
    targets, labels, image paths relative to the manifest, image sha256s)."""
    loaded = read_manifest(manifest)
    samples = loaded.split(split)
    if not samples:
        raise DataError(f"{loaded.root}: the {split} split is empty")
    if list(loaded.labels) != ckpt.labels:
        raise DataError(
            f"the checkpoint's labels {ckpt.labels} differ from the manifest's "
            f"{list(loaded.labels)}"
        )
    target_device = resolve_device(device)
    serving = ServingModel(ckpt.classifier).to(target_device).eval()
    loader = make_loader(
        ImageDataset(samples, eval_transform(ckpt.image_size)),
        EpochSampler(len(samples), seed=0, shuffle=False),
        batch_size=batch_size,
        workers=workers,
        pin_memory=target_device.type == "cuda",
        drop_last=False,
    )
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for images, batch_targets in tqdm(loader, desc=f"evaluate {split}", disable=not progress):
        nhwc = images.permute(0, 2, 3, 1).contiguous().to(target_device, non_blocking=True)
        outputs.append(serving(nhwc).float().cpu())
        targets.append(batch_targets)
    probabilities = torch.cat(outputs).double().numpy()
    return (
        probabilities,
        torch.cat(targets).numpy().astype(np.int64),
        list(loaded.labels),
        [s.path.relative_to(loaded.root).as_posix() for s in samples],
        [s.sha256 for s in samples],
    )


def evaluate(
    checkpoint: Path,
    manifest: Path,
    out: Path,
    *,
    split: str = "val",
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> Evaluation:
    """Evaluate and write every output (see the module docstring)."""
    if not 0 < target_accuracy <= 1:
        raise DataError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    ckpt = load_checkpoint(checkpoint)
    probabilities, targets, labels, paths, hashes = predict(
        ckpt,
        manifest,
        split=split,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
    )
    metrics = compute_metrics(probabilities, targets, labels, target_accuracy=target_accuracy)
    meta = ckpt.meta
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "checkpoint_epoch": meta.get("epoch"),
        "initialisation": meta.get("initialisation"),
        "manifest": str(read_manifest(manifest).root),
        "split": split,
        "image_size": meta.get("image_size"),
        "labels": labels,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
    }
    _write_predictions(out / PREDICTIONS_NAME, probabilities, targets, labels, paths, hashes)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / SUMMARY_NAME).write_text(summary_markdown(report))
    (out / CONFUSION_TXT).write_text(confusion_text(metrics["confusion_matrix"], labels))
    plot_confusion(metrics["confusion_matrix"], labels, out / CONFUSION_PNG)
    recommended = metrics["recommended_threshold"]
    threshold = {
        "confidence_threshold": recommended["threshold"],
        "achieved": recommended["achieved"],
        "target_accuracy": target_accuracy,
        "coverage": recommended["coverage"],
        "accuracy_on_covered": recommended["accuracy"],
        "images": metrics["images"],
        "split": split,
        "checkpoint_sha256": report["checkpoint_sha256"],
    }
    (out / THRESHOLD_NAME).write_text(json.dumps(threshold, indent=2) + "\n")
    if not recommended["achieved"]:
        log.warning(
            "no confidence threshold reaches accuracy %.3f; recommending 1.0", target_accuracy
        )
    log.info(
        "accuracy %.4f, macro F1 %.4f, log loss %.4f, ECE %.4f; threshold %.4f covers %.1f%% -> %s",
        metrics["accuracy"],
        metrics["macro_f1"],
        metrics["log_loss"],
        metrics["expected_calibration_error"],
        recommended["threshold"],
        100 * recommended["coverage"],
        out,
    )
    return Evaluation(
        out=out,
        accuracy=metrics["accuracy"],
        threshold=recommended["threshold"],
        threshold_achieved=recommended["achieved"],
        report=report,
    )


def _write_predictions(
    path: Path,
    probabilities: FloatArray,
    targets: IntArray,
    labels: Sequence[str],
    paths: Sequence[str],
    hashes: Sequence[str],
) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "sha256", "label", "predicted", "confidence", "correct"]
            + [f"p_{name}" for name in labels]
        )
        for row, target, image, sha in zip(probabilities, targets, paths, hashes, strict=True):
            best = int(row.argmax())
            writer.writerow(
                [image, sha, labels[int(target)], labels[best], f"{row[best]:.9g}"]
                + [int(best == int(target))]
                + [f"{p:.9g}" for p in row]
            )
