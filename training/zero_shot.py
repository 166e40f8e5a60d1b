"""The cold-start model: EfficientNet-Lite0's ImageNet classifier, read as our categories.

No training: each category's score is the ImageNet probability mass of a reviewed list of
ImageNet classes (`imagenet_categories.csv` beside this file; `imagenet_labels.txt` holds
ImageNet's 1000 class names in output order). The mass of every other ImageNet class is
spread evenly over the categories (training.model.ServingModel's fold), so the output is
still C probabilities that sum to 1, the argmax is the category with the most mass, and a
photo of none of the categories (a face, an animal) gets a top probability near 1/C. The
recommended confidence threshold (`CONFIDENCE_THRESHOLD`) was chosen by `python -m
training evaluate --model zero-shot` on real photos; it travels in the model config like a
trained model's, so the consumer needs nothing special.

- `read_category_map(path, labels)` reads and checks the mapping: every index is an
  ImageNet class whose name matches the labels file, none is in two categories, every
  category has at least one. Raises `DataError`.
- `zero_shot_checkpoint(labels)` returns the model as a `Checkpoint` (what evaluate and
  export take). Raises `DataError` for a mapping that does not cover `labels` and
  `CheckpointError` when the weights package is missing.
- `fingerprint()` identifies the model's inputs (weights, mapping, code) for caches.
- `zero_shot_onnx(labels)` returns the exported, parity-checked graph (built once, then
  cached) and the parameters its Triton config carries (`confidence_threshold`,
  `model_description`); `python -m training.repository bootstrap` serves it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import torch

from training import efficientnet
from training.errors import CheckpointError, DataError
from training.model import DEFAULT_LABELS, export_onnx, fold_matrix, read_labels
from training.repository import CONFIDENCE_THRESHOLD_PARAMETER, DESCRIPTION_PARAMETER
from training.train import Checkpoint

log = logging.getLogger(__name__)

HERE: Final = Path(__file__).resolve().parent
CATEGORY_MAP: Final = HERE / "imagenet_categories.csv"
IMAGENET_LABELS: Final = HERE / "imagenet_labels.txt"
# The committed real photos (one folder per category, ATTRIBUTION.md).
PHOTOS: Final = HERE / "photos"
CATEGORY_MAP_COLUMNS: Final = ("index", "imagenet_class", "category")
IMAGE_SIZE: Final = efficientnet.NATIVE_IMAGE_SIZE
ARCH: Final = "efficientnet_lite0"
# Chosen by `python -m training evaluate --model zero-shot --data <prepared
# training/photos> --split all --target-accuracy 0.99 --max-ood-confident 0.01` (recommended
# 0.4822; training/README.md, "Cold start"): stricter than the 97% right and 5%
# out-of-category confident, because the service sees photos of other sources than these,
# where confidences spread. Evaluate again, and change it, whenever the mapping changes.
CONFIDENCE_THRESHOLD: Final = 0.48
DESCRIPTION: Final = (
    "zero-shot cold-start model: EfficientNet-Lite0 ImageNet classifier, untrained on "
    "our photos; a category scores the ImageNet probability of its classes in "
    "training/imagenet_categories.csv"
)


def read_category_map(
    path: Path = CATEGORY_MAP, imagenet_labels: Sequence[str] | None = None
) -> dict[str, list[int]]:
    """Category -> ImageNet class indices, in file order, checked (see module docstring)."""
    names = list(imagenet_labels) if imagenet_labels is not None else read_labels(IMAGENET_LABELS)
    mapping: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or tuple(reader.fieldnames) != CATEGORY_MAP_COLUMNS:
            raise DataError(f"{path}: header must be {','.join(CATEGORY_MAP_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
                index = int(row["index"])
            except ValueError:
                raise DataError(f"{path}:{line}: index {row['index']!r} is no number") from None
            if not 0 <= index < len(names):
                raise DataError(f"{path}:{line}: index {index} is no ImageNet class")
            if row["imagenet_class"] != names[index]:
                raise DataError(
                    f"{path}:{line}: class {index} is {names[index]!r}, "
                    f"not {row['imagenet_class']!r}"
                )
            if index in owner:
                raise DataError(
                    f"{path}:{line}: {names[index]!r} is in {owner[index]!r} and "
                    f"{row['category']!r}; a class belongs to one category at most"
                )
            owner[index] = row["category"]
            mapping.setdefault(row["category"], []).append(index)
    return mapping


def fingerprint() -> str:
    """SHA-256 over what the zero-shot model is made of: its weights, mapping and code."""
    digest = hashlib.sha256()
    for path in (
        efficientnet.imagenet_weights_path(),
        CATEGORY_MAP,
        IMAGENET_LABELS,
        HERE / "efficientnet.py",
        HERE / "model.py",
        Path(__file__),
    ):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def zero_shot_checkpoint(labels: Sequence[str] = DEFAULT_LABELS) -> Checkpoint:
    """The cold-start model serving `labels`, each scored by its mapped ImageNet mass."""
    mapping = read_category_map()
    missing = [label for label in labels if label not in mapping]
    if missing:
        raise DataError(f"{CATEGORY_MAP} maps no ImageNet class to {missing}")
    try:
        classifier = efficientnet.load_imagenet()
        identity = fingerprint()
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from exc
    fold = fold_matrix([mapping[label] for label in labels], efficientnet.IMAGENET_CLASSES)
    return Checkpoint(
        classifier=classifier.eval(),
        labels=list(labels),
        image_size=IMAGE_SIZE,
        meta={
            "model": "zero-shot",
            "sha256": identity,
            "initialisation": "ImageNet (installed), zero-shot",
            "description": DESCRIPTION,
            "confidence_threshold": CONFIDENCE_THRESHOLD,
        },
        arch=ARCH,
        fold=fold,
    )


def cache_dir() -> Path:
    """Where built zero-shot graphs are kept (`$XDG_CACHE_HOME` or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "category-suggester" / "zero-shot"


def served_parameters() -> dict[str, str]:
    """The model-config parameters of the zero-shot model: its threshold and what it is."""
    return {
        CONFIDENCE_THRESHOLD_PARAMETER: repr(CONFIDENCE_THRESHOLD),
        DESCRIPTION_PARAMETER: DESCRIPTION,
    }


def parity_photos(per_category: int = 2) -> list[Path]:
    """A few committed real photos per category folder (none when they are absent)."""
    if not PHOTOS.is_dir():
        return []
    return [
        path
        for folder in sorted(p for p in PHOTOS.iterdir() if p.is_dir())
        for path in sorted(folder.glob("*.jpg"))[:per_category]
    ]


def zero_shot_onnx(labels: Sequence[str] = DEFAULT_LABELS) -> tuple[Path, dict[str, str]]:
    """The zero-shot serving graph as ONNX, and the parameters its config carries.

    Built once per fingerprint, torch version and label list, parity-checked like every
    export (training.export.check_parity: onnxruntime against PyTorch on real photos and
    random pixels), then kept in `cache_dir()`; later calls return the cached file (a
    few seconds instead of a minute). Raises ParityError, DataError, CheckpointError.
    """
    from training.export import DEFAULT_ATOL, check_parity, parity_inputs

    key = hashlib.sha256(
        "\n".join([fingerprint(), torch.__version__, *labels]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"efficientnet-lite0-zero-shot-{IMAGE_SIZE}-{key}.onnx"
    if target.is_file():
        log.info("zero-shot model from the cache: %s", target)
        return target, served_parameters()
    log.info("building the zero-shot cold-start model (EfficientNet-Lite0, ImageNet)")
    ckpt = zero_shot_checkpoint(labels)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        export_onnx(ckpt.classifier, partial, image_size=IMAGE_SIZE, arch=ckpt.arch, fold=ckpt.fold)
        images = parity_inputs(ckpt, None, photos=parity_photos())
        check_parity(ckpt, partial, images, atol=DEFAULT_ATOL)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target, served_parameters()
