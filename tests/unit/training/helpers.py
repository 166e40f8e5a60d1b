"""Settings and types shared by the training tests and their fixtures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.data import Augment
from training.train import TrainConfig, TrainResult

IMAGE_SIZE = 64
PER_CLASS = 32


@dataclass(frozen=True)
class Trained:
    manifest: Path
    result: TrainResult
    seconds: float


def tiny_config(manifest: Path, out: Path, **overrides: object) -> TrainConfig:
    """The settings under which two epochs from scratch learn the synthetic set on a CPU."""
    settings: dict[str, object] = {
        "manifest": manifest,
        "out": out,
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.01,
        "image_size": IMAGE_SIZE,
        "weights": "none",
        "augment": Augment(crop_scale=(0.6, 1.0), hue=0.0),
        "workers": 0,
        "seed": 0,
        "progress": False,
    }
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]
