"""Evaluate: a model and a split of the manifest -> metrics, plots and a threshold.

Takes a checkpoint written by `train` (or the zero-shot cold-start model, as a
`Checkpoint`) and the manifest `prepare` wrote. Classifies the split (validation by
default, or `all`) through `ServingModel`, the graph export serves: the service's
preprocessing, uint8 pixels in, probabilities out. The numbers are therefore those of the
served model.

Photos of none of the categories ("out of category", OOD) come from the manifest's
`out_of_category` class (training.model.BACKGROUND_LABEL) in the split, and from an
optional folder `ood`. They count in no accuracy; what is measured on them is the share
marked confident. A manifest category the model does not serve is an error; a category
the model serves but the data lacks just never is the truth.

Writes into `out`:
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
  probability reaches it (the largest coverage that meets the target) and, when there are
  OOD photos, marks at most `max_ood_confident` of them confident.
The threshold table shows the trade-off: per threshold, coverage, the precision of
confident suggestions and the share of OOD photos marked confident. Returns an
`Evaluation`.

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

from training.data import (
    EpochSampler,
    ImageDataset,
    Sample,
    eval_transform,
    make_loader,
    read_manifest,
)
from training.errors import DataError
from training.model import BACKGROUND_LABEL
from training.train import Checkpoint, load_checkpoint, resolve_device

log = logging.getLogger(__name__)

REPORT_NAME: Final = "report.json"
SUMMARY_NAME: Final = "summary.md"
PREDICTIONS_NAME: Final = "predictions.csv"
THRESHOLD_NAME: Final = "threshold.json"
CONFUSION_PNG: Final = "confusion_matrix.png"
CONFUSION_TXT: Final = "confusion_matrix.txt"
DEFAULT_TARGET_ACCURACY: Final = 0.95
DEFAULT_MAX_OOD_CONFIDENT: Final = 0.05
# The quality targets (top-1, confident right, OOD confident), printed beside the
# measured numbers: the cold-start model on photos of a source it never saw, and a model
# after `make train-demo` on held-out photos of the same sources.
TARGETS: Final[dict[str, tuple[float, float, float]]] = {
    "cold-start": (0.90, 0.97, 0.05),
    "after train-demo": (0.95, 0.98, 0.05),
}
# Where OOD photos stand in the target vector: the manifest index of none of the labels.
OOD_TARGET: Final = -1
SPLIT_CHOICES: Final = ("val", "train", "all")
IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
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
    *,
    ood_confidence: FloatArray | None = None,
) -> list[dict[str, Any]]:
    """Per threshold t: the share of images with confidence >= t (coverage), how many, the
    accuracy on them (the precision of confident suggestions; None when none is covered)
    and, given OOD confidences, the share of OOD photos at or above t."""
    rows: list[dict[str, Any]] = []
    for t in thresholds:
        covered = confidence >= t
        count = int(covered.sum())
        row: dict[str, Any] = {
            "threshold": float(t),
            "coverage": count / len(confidence) if len(confidence) else 0.0,
            "covered": count,
            "accuracy": float(correct[covered].mean()) if count else None,
        }
        if ood_confidence is not None:
            row["ood_confident"] = _share_at_least(ood_confidence, t)
        rows.append(row)
    return rows


def _share_at_least(values: FloatArray, threshold: float) -> float | None:
    return float(np.mean(values >= threshold)) if len(values) else None


def recommend_threshold(
    confidence: FloatArray,
    correct: npt.NDArray[np.bool_],
    target_accuracy: float,
    *,
    ood_confidence: FloatArray | None = None,
    max_ood_confident: float = DEFAULT_MAX_OOD_CONFIDENT,
) -> dict[str, Any]:
    """The lowest confidence threshold whose covered images reach `target_accuracy` and,
    given OOD confidences, that marks at most `max_ood_confident` of them confident.

    Candidates are the observed confidences, so the answer is exact on this data. With
    OOD photos, the threshold then sits midway in the gap that gives the same numbers here:
    between the lowest confidence it covers and the highest it must leave out (the next
    category photo, or the OOD photo over the allowance), so a new photo near either side
    goes with the nearer one. When no threshold meets both, the threshold is 1.0 (nothing
    is marked confident) and `achieved` is False.
    """
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    hits = np.cumsum(correct[order])
    counts = np.arange(1, len(sorted_conf) + 1)
    accuracy = hits / counts
    # Only the last of equal confidences is a real cut: a threshold covers all its ties.
    is_cut = np.append(sorted_conf[1:] != sorted_conf[:-1], True)
    meeting = is_cut & (accuracy >= target_accuracy)
    ood = ood_confidence if ood_confidence is not None else np.zeros(0)
    allowed = int(np.floor(max_ood_confident * len(ood) + 1e-9))
    bound = -np.inf
    if allowed < len(ood):
        # At most `allowed` OOD photos may reach the threshold: it must lie above the
        # (allowed + 1)-th highest OOD confidence.
        bound = float(np.sort(ood)[::-1][allowed])
        meeting &= sorted_conf > bound
    found = np.flatnonzero(meeting)
    extra: dict[str, Any] = {}
    if ood_confidence is not None:
        extra["max_ood_confident"] = max_ood_confident
    if len(found) == 0:
        return {
            "threshold": 1.0,
            "achieved": False,
            "target_accuracy": target_accuracy,
            "coverage": float(np.mean(confidence >= 1.0)) if len(confidence) else 0.0,
            "accuracy": None,
            **extra,
            **_ood_share(ood_confidence, 1.0),
        }
    cut = int(found[-1])
    threshold = float(sorted_conf[cut])
    if ood_confidence is not None:
        below = float(sorted_conf[cut + 1]) if cut + 1 < len(sorted_conf) else -np.inf
        excluded = max(below, bound)
        if np.isfinite(excluded):
            threshold = (threshold + excluded) / 2
    return {
        "threshold": threshold,
        "achieved": True,
        "target_accuracy": target_accuracy,
        "coverage": (cut + 1) / len(sorted_conf),
        "accuracy": float(accuracy[cut]),
        **extra,
        **_ood_share(ood_confidence, threshold),
    }


def _ood_share(ood_confidence: FloatArray | None, threshold: float) -> dict[str, Any]:
    if ood_confidence is None:
        return {}
    return {"ood_confident": _share_at_least(ood_confidence, threshold)}


def at_threshold(
    confidence: FloatArray,
    correct: npt.NDArray[np.bool_],
    threshold: float,
    ood_confidence: FloatArray | None = None,
) -> dict[str, Any]:
    """Coverage, confident precision and OOD confident share at one given threshold."""
    covered = confidence >= threshold
    count = int(covered.sum())
    return {
        "threshold": threshold,
        "coverage": count / len(confidence) if len(confidence) else 0.0,
        "accuracy": float(correct[covered].mean()) if count else None,
        **_ood_share(ood_confidence, threshold),
    }


def compute_metrics(
    probabilities: FloatArray,
    targets: IntArray,
    labels: Sequence[str],
    *,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    ood_probabilities: FloatArray | None = None,
    max_ood_confident: float = DEFAULT_MAX_OOD_CONFIDENT,
    served_threshold: float | None = None,
) -> dict[str, Any]:
    """Every number of the report from `[N, C]` probabilities and `[N]` true class indices,
    and `[M, C]` probabilities of OOD photos when there are any. `served_threshold`: the
    threshold the model is served with, reported beside the recommended one."""
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
    ood_confidence = None if ood_probabilities is None else ood_probabilities.max(axis=1)
    ood: dict[str, Any] = {}
    if ood_confidence is not None:
        ood["ood_images"] = len(ood_confidence)
        ood["max_ood_confident"] = max_ood_confident
    if served_threshold is not None:
        ood["served_threshold"] = at_threshold(
            confidence, correct, served_threshold, ood_confidence
        )
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
        "threshold_table": threshold_table(confidence, correct, ood_confidence=ood_confidence),
        "recommended_threshold": recommend_threshold(
            confidence,
            correct,
            target_accuracy,
            ood_confidence=ood_confidence,
            max_ood_confident=max_ood_confident,
        ),
        **ood,
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
    has_ood = "ood_images" in metrics
    lines = [
        "# Evaluation",
        "",
        f"- model: `{report['checkpoint']}` (epoch {report['checkpoint_epoch']}, "
        f"{report['initialisation']})",
        f"- split: {report['split']} ({metrics['images']} photos of the categories"
        + (f", {metrics['ood_images']} of none" if has_ood else "")
        + f"), image size {report['image_size']} px",
        f"- accuracy: **{metrics['accuracy']:.4f}**, macro F1 {metrics['macro_f1']:.4f}",
        f"- log loss {metrics['log_loss']:.4f}, expected calibration error "
        f"{metrics['expected_calibration_error']:.4f} ({metrics['ece_bins']} bins)",
    ]
    ood_clause = (
        f" and at most {rec['max_ood_confident']:.0%} of out-of-category photos confident"
        if has_ood
        else ""
    )
    if rec["achieved"]:
        lines.append(
            f"- recommended confidence threshold **{rec['threshold']:.4f}**: accuracy "
            f"{rec['accuracy']:.4f} on the {rec['coverage']:.1%} of images it covers "
            f"(target {rec['target_accuracy']:.2f}{ood_clause})"
        )
    else:
        lines.append(
            f"- no threshold reaches accuracy {rec['target_accuracy']:.2f}{ood_clause}; the "
            "recommended threshold is 1.0 (nothing marked confident)"
        )
    lines += ["", *quality_table(metrics, rec, "the recommended threshold")]
    if "served_threshold" in metrics:
        lines += [
            "",
            *quality_table(
                metrics, metrics["served_threshold"], "the threshold the model is served with"
            ),
        ]
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
        "Trade-off (coverage: share of category photos marked confident; confident "
        "precision: share of those that are right"
        + ("; OOD confident: share of out-of-category photos marked confident):" if has_ood
           else "):"),
        "",
        "| threshold | coverage | confident precision |" + (" OOD confident |" if has_ood else ""),
        "|---:|---:|---:|" + ("---:|" if has_ood else ""),
    ]  # fmt: skip
    for row in metrics["threshold_table"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.4f}"
        line = f"| {row['threshold']:.3f} | {row['coverage']:.1%} | {accuracy} |"
        if has_ood:
            line += f" {_percent(row['ood_confident'])} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def quality_table(metrics: dict[str, Any], point: dict[str, Any], name: str) -> list[str]:
    """The three quality numbers at one threshold, beside the targets (`TARGETS`)."""
    names = list(TARGETS)
    top1, precision, ood = zip(*TARGETS.values(), strict=True)
    if "ood_images" in metrics:
        ood_cells = (f"({metrics['ood_images']})", _percent(point.get("ood_confident")))
    else:
        ood_cells = ("", "not measured")
    return [
        f"At {name} {point['threshold']:.4f}:",
        "",
        "| | measured | " + " | ".join(f"target {n}" for n in names) + " |",
        "|---|---:|" + "---:|" * len(names),
        f"| top-1 over the categories ({metrics['images']}) | {metrics['accuracy']:.1%} | "
        + " | ".join(f">= {t:.0%}" for t in top1)
        + " |",
        f"| confident suggestions right ({point['coverage']:.1%} confident) | "
        f"{_percent(point['accuracy'])} | " + " | ".join(f">= {t:.0%}" for t in precision) + " |",
        f"| photos of no category marked confident {ood_cells[0]} | {ood_cells[1]} | "
        + " | ".join(f"<= {t:.0%}" for t in ood)
        + " |",
    ]


@dataclass(frozen=True)
class Predictions:
    """Probabilities of the served graph on a set of photos: `[N, C]` in the model's
    label order, `targets` the true category index or OOD_TARGET, with paths and hashes."""

    probabilities: FloatArray
    targets: IntArray
    paths: list[str]
    hashes: list[str]


def split_samples(manifest: Path, split: str) -> tuple[list[Sample], tuple[str, ...], Path]:
    """The samples of `split` ("all" for both), the manifest's labels and its folder."""
    loaded = read_manifest(manifest)
    if split not in SPLIT_CHOICES:
        raise DataError(f"unknown split {split!r}; expected one of {', '.join(SPLIT_CHOICES)}")
    samples = list(loaded.samples) if split == "all" else loaded.split(split)
    if not samples:
        raise DataError(f"{loaded.root}: the {split} split is empty")
    return samples, loaded.labels, loaded.root


def ood_samples(folder: Path) -> list[Sample]:
    """Every image file under `folder` (recursively), as OOD samples."""
    if not folder.is_dir():
        raise DataError(f"OOD folder {folder} does not exist")
    paths = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths:
        raise DataError(f"OOD folder {folder} holds no image files")
    return [
        Sample(path=path, label=OOD_TARGET, split="ood", sha256=sha256_file(path), source="ood")
        for path in paths
    ]


@torch.no_grad()
def predict_samples(
    ckpt: Checkpoint,
    samples: Sequence[Sample],
    *,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    progress: bool = True,
    desc: str = "evaluate",
) -> FloatArray:
    """`[N, C]` probabilities of `ckpt.serving_model()` on the samples, preprocessed as the
    service preprocesses them."""
    target_device = resolve_device(device)
    serving = ckpt.serving_model().to(target_device).eval()
    loader = make_loader(
        ImageDataset(samples, eval_transform(ckpt.image_size)),
        EpochSampler(len(samples), seed=0, shuffle=False),
        batch_size=batch_size,
        workers=workers,
        pin_memory=target_device.type == "cuda",
        drop_last=False,
    )
    outputs: list[torch.Tensor] = []
    for images, _ in tqdm(loader, desc=desc, disable=not progress):
        nhwc = images.permute(0, 2, 3, 1).contiguous().to(target_device, non_blocking=True)
        outputs.append(serving(nhwc).float().cpu())
    return torch.cat(outputs).double().numpy()


def predict(
    ckpt: Checkpoint,
    manifest: Path,
    *,
    split: str = "val",
    ood: Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> Predictions:
    """Probabilities on a split of the manifest, then on the photos of the `ood` folder.

    Samples of the manifest's background class are OOD. Raises DataError when the
    manifest has a category the model does not serve.
    """
    samples, manifest_labels, root = split_samples(manifest, split)
    unknown = [
        label for label in manifest_labels if label != BACKGROUND_LABEL and label not in ckpt.labels
    ]
    if unknown:
        raise DataError(
            f"the manifest's labels {list(manifest_labels)} hold {unknown}, which the model "
            f"(labels {ckpt.labels}) does not serve"
        )
    to_model = [
        OOD_TARGET if label == BACKGROUND_LABEL else ckpt.labels.index(label)
        for label in manifest_labels
    ]
    paths = [s.path.relative_to(root).as_posix() for s in samples]
    hashes = [s.sha256 for s in samples]
    targets = [to_model[s.label] for s in samples]
    extra = ood_samples(ood) if ood is not None else []
    paths += [str(s.path) for s in extra]
    hashes += [s.sha256 for s in extra]
    targets += [OOD_TARGET] * len(extra)
    probabilities = predict_samples(
        ckpt,
        [*samples, *extra],
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
        desc=f"evaluate {split}" + (" + OOD" if extra else ""),
    )
    return Predictions(probabilities, np.asarray(targets, dtype=np.int64), paths, hashes)


def evaluate(
    model: Path | Checkpoint,
    manifest: Path,
    out: Path,
    *,
    split: str = "val",
    ood: Path | None = None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
    max_ood_confident: float = DEFAULT_MAX_OOD_CONFIDENT,
    batch_size: int = 64,
    workers: int = 0,
    device: str = "auto",
    progress: bool = True,
) -> Evaluation:
    """Evaluate and write every output (see the module docstring).

    `model`: a checkpoint file written by train, or a `Checkpoint` built in memory (the
    zero-shot model), whose `meta["sha256"]` identifies it.
    """
    if not 0 < target_accuracy <= 1:
        raise DataError(f"target accuracy must be in (0, 1], got {target_accuracy}")
    if not 0 <= max_ood_confident <= 1:
        raise DataError(f"the OOD confident share must be in [0, 1], got {max_ood_confident}")
    if isinstance(model, Path):
        ckpt, name, sha = load_checkpoint(model), str(model), sha256_file(model)
    else:
        ckpt, name, sha = model, str(model.meta.get("model", "in memory")), model.meta["sha256"]
    predictions = predict(
        ckpt,
        manifest,
        split=split,
        ood=ood,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress=progress,
    )
    labels = ckpt.labels
    in_category = predictions.targets != OOD_TARGET
    if not in_category.any():
        raise DataError(f"the {split} split holds no photo of a category")
    ood_probabilities = predictions.probabilities[~in_category] if (~in_category).any() else None
    meta = ckpt.meta
    served = meta.get("confidence_threshold")
    metrics = compute_metrics(
        predictions.probabilities[in_category],
        predictions.targets[in_category],
        labels,
        target_accuracy=target_accuracy,
        ood_probabilities=ood_probabilities,
        max_ood_confident=max_ood_confident,
        served_threshold=float(served) if served is not None else None,
    )
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "checkpoint": name,
        "checkpoint_sha256": sha,
        "checkpoint_epoch": meta.get("epoch"),
        "initialisation": meta.get("initialisation"),
        "arch": ckpt.arch,
        "manifest": str(read_manifest(manifest).root),
        "split": split,
        "ood_folder": None if ood is None else str(ood),
        "image_size": ckpt.image_size,
        "labels": labels,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
    }
    _write_predictions(out / PREDICTIONS_NAME, predictions, labels)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / SUMMARY_NAME).write_text(summary_markdown(report))
    (out / CONFUSION_TXT).write_text(confusion_text(metrics["confusion_matrix"], labels))
    plot_confusion(metrics["confusion_matrix"], labels, out / CONFUSION_PNG)
    recommended = metrics["recommended_threshold"]
    threshold = {
        "confidence_threshold": recommended["threshold"],
        "achieved": recommended["achieved"],
        "target_accuracy": target_accuracy,
        "max_ood_confident": max_ood_confident if ood_probabilities is not None else None,
        "coverage": recommended["coverage"],
        "accuracy_on_covered": recommended["accuracy"],
        "ood_confident": recommended.get("ood_confident"),
        "images": metrics["images"],
        "ood_images": metrics.get("ood_images", 0),
        "split": split,
        "checkpoint_sha256": sha,
    }
    (out / THRESHOLD_NAME).write_text(json.dumps(threshold, indent=2) + "\n")
    if not recommended["achieved"]:
        log.warning(
            "no confidence threshold reaches accuracy %.3f%s; recommending 1.0",
            target_accuracy,
            "" if ood_probabilities is None else f" with at most {max_ood_confident:.0%} OOD",
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


def _write_predictions(path: Path, predictions: Predictions, labels: Sequence[str]) -> None:
    """One row per photo; an OOD photo's label is BACKGROUND_LABEL and `correct` is 0."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["path", "sha256", "label", "predicted", "confidence", "correct"]
            + [f"p_{name}" for name in labels]
        )
        for row, target, image, sha in zip(
            predictions.probabilities,
            predictions.targets,
            predictions.paths,
            predictions.hashes,
            strict=True,
        ):
            best = int(row.argmax())
            truth = BACKGROUND_LABEL if target == OOD_TARGET else labels[int(target)]
            writer.writerow(
                [image, sha, truth, labels[best], f"{row[best]:.9g}"]
                + [int(best == int(target))]
                + [f"{p:.9g}" for p in row]
            )
