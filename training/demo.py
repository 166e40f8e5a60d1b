"""The demo: real photos -> prepare -> train -> evaluate -> export, in minutes on a CPU.

`demo(out, ...)` fine-tunes EfficientNet-Lite0 from its ImageNet weights (installed with the
project, so no network is needed) on the committed real photos (training/photos: one folder
per category and `out_of_category`, photos of none of them; ATTRIBUTION.md names source and
licence). `prepare` splits them 70/30, stratified and seeded; the backbone is frozen but for
its last stage, so a few epochs at 224 px take minutes on two cores. The out_of_category
training photos teach a background class that export folds away (training.model), so
photos of none of the categories are not marked confident; the held-out ones measure that.
Evaluation is on the held-out photos only, against the targets for a trained model
(confident suggestions right >= 98%, out-of-category marked confident <= 5%), and chooses
the threshold the export carries. Returns a `DemoResult`; raises what the steps raise.

`synthetic=True` draws synthetic photos instead (training/synthetic.py): what the tests use
to run the whole workflow in seconds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from training.data import Augment
from training.errors import DataError
from training.evaluate import Evaluation, evaluate
from training.export import DEFAULT_REPOSITORY, ExportResult, export
from training.prepare import prepare
from training.synthetic import generate
from training.train import TrainConfig, TrainResult, train
from training.zero_shot import PHOTOS

log = logging.getLogger(__name__)

DEMO_TARGET_ACCURACY: Final = 0.98
DEMO_MAX_OOD_CONFIDENT: Final = 0.05


@dataclass(frozen=True)
class DemoResult:
    training: TrainResult
    evaluation: Evaluation
    export: ExportResult | None
    seconds: float


def demo(
    out: Path,
    *,
    photos: Path = PHOTOS,
    synthetic: bool = False,
    repo_root: Path | None = DEFAULT_REPOSITORY,
    arch: str = "efficientnet_lite0",
    weights: str = "imagenet",
    freeze_backbone: bool = True,
    per_class: int = 40,
    image_size: int = 224,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 0.01,
    workers: int = 2,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """prepare -> train -> evaluate -> export (skipped when repo_root is None)."""
    started = time.perf_counter()
    if synthetic:
        source = generate(out / "raw", per_class=per_class, seed=seed)
    elif not photos.is_dir():
        raise DataError(f"no photos in {photos}: expected one folder per category")
    else:
        source = photos
    data = out / "data"
    report = prepare(source, data, stored_size=max(image_size, 128), seed=seed, progress=progress)
    log.info("prepared:\n%s", report.summary())
    run = out / "train"
    trained = train(
        TrainConfig(
            manifest=data,
            out=run,
            arch=arch,
            freeze_backbone=freeze_backbone,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            image_size=image_size,
            weights=weights,
            # Synthetic classes differ by colour: keep hue jitter out of their way.
            augment=Augment(crop_scale=(0.5, 1.0), hue=0.0 if synthetic else 0.02),
            workers=workers,
            seed=seed,
            progress=progress,
        )
    )
    evaluation = evaluate(
        trained.best_checkpoint,
        data,
        run / "eval",
        target_accuracy=DEMO_TARGET_ACCURACY,
        max_ood_confident=DEMO_MAX_OOD_CONFIDENT,
        workers=workers,
        progress=progress,
    )
    exported = None
    if repo_root is not None:
        exported = export(trained.best_checkpoint, run / "eval", repo_root=repo_root)
    return DemoResult(
        training=trained,
        evaluation=evaluation,
        export=exported,
        seconds=time.perf_counter() - started,
    )
