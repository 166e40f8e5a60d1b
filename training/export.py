"""Export: a checkpoint and its evaluation -> a new model version in the Triton repositories.

Takes a checkpoint written by `train` and the folder `evaluate` wrote for that checkpoint.
Exports `ServingModel` to ONNX and checks parity first: onnxruntime (CPU) against PyTorch on
the same uint8 images (validation images from the manifest when it is at hand, plus random
pixels), as a batch and one image at a time, within `atol` on every probability. Only then
writes version N into each repository (`<repo>/cpu`, `<repo>/gpu`), the same N in both: one
more than the highest version either holds, or the one asked for. Each version holds
`model.onnx` and, beside it, `labels.txt`, `report.json`, `summary.md` and `threshold.json`
(the recommended confidence threshold for the consumer's `confident` flag); `labels.txt`
and `config.pbtxt` at the model level follow the new version, and the config carries that
threshold as the model parameter `confidence_threshold`, which the consumer reads from
Triton. A version is never
overwritten. Returns an `ExportResult`.

Raises `ParityError` (nothing written), `VersionExistsError` (nothing written),
`DataError` (no evaluation, one of another checkpoint, or a threshold.json without a
threshold in [0, 1]) and `CheckpointError`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import torch

from training.data import read_manifest, serving_image
from training.errors import DataError, ParityError, VersionExistsError
from training.evaluate import (
    REPORT_NAME,
    SUMMARY_NAME,
    THRESHOLD_NAME,
    sha256_file,
)
from training.model import INPUT_NAME, OUTPUT_NAME, export_onnx, write_labels
from training.repository import (
    DESCRIPTION_PARAMETER,
    KINDS,
    Kind,
    add_version,
    latest_version,
    model_dir,
    threshold_parameters,
)
from training.train import Checkpoint, load_checkpoint

log = logging.getLogger(__name__)

DEFAULT_REPOSITORY: Final = Path("model_repository")
DEFAULT_ATOL: Final = 1e-4
PARITY_IMAGES: Final = 16
RANDOM_IMAGES: Final = 4

UInt8Array = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class ExportResult:
    version: int
    directories: dict[Kind, Path]
    max_abs_diff: float
    parity_images: int


def parity_inputs(
    ckpt: Checkpoint,
    manifest: Path | None,
    *,
    photos: Sequence[Path] = (),
    seed: int = 0,
) -> UInt8Array:
    """uint8 NHWC images to compare on: validation images when a manifest is given, the
    `photos`, then random pixels (which reach corners real photos do not)."""
    size = ckpt.image_size
    files = list(photos)
    if manifest is not None:
        files = [sample.path for sample in read_manifest(manifest).split("val")[:PARITY_IMAGES]]
        files += list(photos)
    images: list[UInt8Array] = [
        serving_image(path, size).permute(1, 2, 0).numpy() for path in files
    ]
    rng = np.random.default_rng(seed)
    images.extend(
        rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(RANDOM_IMAGES)
    )
    return np.stack(images)


def check_parity(
    ckpt: Checkpoint, onnx_path: Path, images: UInt8Array, *, atol: float = DEFAULT_ATOL
) -> float:
    """The largest |ONNX - PyTorch| over all probabilities; raises ParityError above `atol`.

    The ONNX model runs as one batch and image by image, so a graph that fixed its batch
    dimension at export fails here rather than in Triton.
    """
    serving = ckpt.serving_model().to("cpu").eval()
    with torch.no_grad():
        expected = serving(torch.from_numpy(images)).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    batched = session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    single = np.concatenate(
        [session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + 1]})[0] for i in range(len(images))]
    )
    worst = 0.0
    for name, got in (("batched", batched), ("one by one", single)):
        if got.shape != expected.shape:
            raise ParityError(f"ONNX output ({name}) has shape {got.shape}, not {expected.shape}")
        diff = float(np.max(np.abs(got - expected)))
        worst = max(worst, diff)
        if not diff <= atol:  # also catches NaN
            raise ParityError(
                f"ONNX and PyTorch disagree ({name}): max |diff| {diff:.3g} > {atol:.3g}"
            )
    agree = float(np.mean(batched.argmax(1) == expected.argmax(1)))
    log.info(
        "parity: ONNX vs PyTorch on %d images, max |diff| %.2e, top-1 agreement %.1f%%",
        len(images),
        worst,
        100 * agree,
    )
    return worst


def next_version(repo_root: Path, kinds: Sequence[Kind]) -> int:
    """One more than the highest version any of the repositories holds."""
    latest = [latest_version(repo_root, kind) or 0 for kind in kinds]
    return max(latest, default=0) + 1


def export(
    checkpoint: Path,
    evaluation: Path,
    *,
    repo_root: Path = DEFAULT_REPOSITORY,
    kinds: Sequence[Kind] = KINDS,
    version: int | None = None,
    manifest: Path | None = None,
    atol: float = DEFAULT_ATOL,
    max_batch_size: int | None = None,
) -> ExportResult:
    """Export, check parity, write the version (see the module docstring).

    `manifest` supplies validation images for the parity check; by default the one the
    evaluation used, when it still exists.
    """
    ckpt = load_checkpoint(checkpoint)
    extra = _evaluation_files(checkpoint, evaluation)
    try:
        parameters = threshold_parameters(extra[THRESHOLD_NAME])
    except ValueError as exc:
        raise DataError(f"the evaluation's threshold cannot be used: {exc}") from exc
    if manifest is None:
        recorded = json.loads((evaluation / REPORT_NAME).read_text()).get("manifest")
        manifest = Path(recorded) if recorded and Path(recorded).is_dir() else None

    number = version if version is not None else next_version(repo_root, kinds)
    taken = [model_dir(repo_root, kind) / str(number) for kind in kinds]
    taken = [path for path in taken if path.exists()]
    if taken:
        raise VersionExistsError(
            f"version {number} exists ({', '.join(map(str, taken))}); versions are never "
            "overwritten: leave out --version to take the next free number"
        )

    parameters[DESCRIPTION_PARAMETER] = (
        f"{ckpt.arch} trained on labelled photos, weights from {ckpt.meta.get('initialisation')}"
    )
    return write_versions(
        ckpt,
        parity_inputs(ckpt, manifest),
        repo_root=repo_root,
        kinds=kinds,
        version=number,
        atol=atol,
        parameters=parameters,
        extra_files=extra,
        max_batch_size=max_batch_size,
    )


def write_versions(
    ckpt: Checkpoint,
    images: UInt8Array,
    *,
    repo_root: Path,
    kinds: Sequence[Kind],
    version: int,
    atol: float,
    parameters: dict[str, str],
    extra_files: dict[str, Path] | None = None,
    max_batch_size: int | None = None,
) -> ExportResult:
    """Export `ckpt`'s serving graph, check parity on `images`, write version `version`
    into each repository of `kinds` with `parameters` in its config; nothing is written
    when parity fails."""
    with tempfile.TemporaryDirectory(prefix="category-classifier-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(
            ckpt.classifier, onnx_path, image_size=ckpt.image_size, arch=ckpt.arch, fold=ckpt.fold
        )
        worst = check_parity(ckpt, onnx_path, images, atol=atol)
        labels_path = Path(tmp) / "labels.txt"
        write_labels(labels_path, ckpt.labels)
        files = {**(extra_files or {}), "labels.txt": labels_path}
        written: dict[Kind, Path] = {}
        for kind in kinds:
            try:
                got = add_version(
                    repo_root,
                    kind,
                    onnx_path,
                    ckpt.labels,
                    image_size=ckpt.image_size,
                    extra_files=files,
                    version=version,
                    parameters=parameters,
                    **({} if max_batch_size is None else {"max_batch_size": max_batch_size}),
                )
            except FileExistsError as exc:
                raise VersionExistsError(str(exc)) from exc
            written[kind] = model_dir(repo_root, kind) / str(got)
            log.info("wrote %s", written[kind])
    return ExportResult(
        version=version, directories=written, max_abs_diff=worst, parity_images=len(images)
    )


def _evaluation_files(checkpoint: Path, evaluation: Path) -> dict[str, Path]:
    """The evaluation outputs that travel with the model; they must be of this checkpoint."""
    files = {name: evaluation / name for name in (REPORT_NAME, SUMMARY_NAME, THRESHOLD_NAME)}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise DataError(
            f"no evaluation to ship with the model (missing {', '.join(missing)}); "
            "run `python -m training evaluate` first"
        )
    recorded = json.loads(files[REPORT_NAME].read_text()).get("checkpoint_sha256")
    if recorded != sha256_file(checkpoint):
        raise DataError(
            f"{files[REPORT_NAME]} evaluates another checkpoint than {checkpoint}; "
            "evaluate this one first"
        )
    return files
