"""The manifest, datasets, transforms and loaders shared by train and evaluate.

Takes the manifest that `training.prepare` writes (`manifest.csv` and `labels.txt` in one
folder); gives datasets that yield `(uint8 CHW image tensor, label index)`. Images stay
uint8 until they reach the device, where `normalize` turns them into the float input of
the classifier, with the architecture's mean and standard deviation that `ServingModel`
applies inside the exported graph: the network sees the same numbers in training and in
serving.

Evaluation images go through `serving_image`, the service's own decoding and
preprocessing (`category_suggester.preprocess.decode_image`: shorter side resized to S, then the
centre S x S crop), so validation numbers are those of the served model. Training images
are augmented instead (random resized crop, flip, colour jitter).

Randomness is keyed, not streamed: the shuffle of epoch e comes from (seed, e), and each
sample's augmentation from (seed, e, index). An epoch therefore looks the same whatever
the number of loader workers, and a resumed run continues exactly where it stopped.

Raises `DataError` when the manifest is missing, malformed or names unknown labels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from category_suggester.preprocess import decode_image
from category_suggester.settings import DecodeSettings
from training.errors import DataError
from training.model import DEFAULT_ARCH, NORMALISATION, Arch, read_labels, write_labels

MANIFEST_NAME: Final = "manifest.csv"
LABELS_NAME: Final = "labels.txt"
MANIFEST_COLUMNS: Final = ("path", "label", "split", "sha256", "source")
SPLITS: Final = ("train", "val")

# An image file -> a uint8 CHW tensor.
ImageTransform = Callable[[Path], torch.Tensor]
# The service's pixel limit, so evaluation refuses exactly what serving refuses.
_MAX_PIXELS: Final = DecodeSettings().max_pixels


@dataclass(frozen=True)
class Sample:
    """One image of the manifest. `path` is absolute; `label` indexes `Manifest.labels`."""

    path: Path
    label: int
    split: str
    sha256: str
    source: str


@dataclass(frozen=True)
class Manifest:
    """A prepared dataset: class names in index order and every kept image."""

    root: Path
    labels: tuple[str, ...]
    samples: tuple[Sample, ...]

    def split(self, name: str) -> list[Sample]:
        """The samples of one split (`train` or `val`), in manifest order."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [sample for sample in self.samples if sample.split == name]


def manifest_dir(path: Path) -> Path:
    """The folder holding the manifest, given that folder or the manifest file itself."""
    return path.parent if path.name == MANIFEST_NAME else path


def write_manifest(folder: Path, labels: Sequence[str], samples: Sequence[Sample]) -> Path:
    """Write `manifest.csv` (paths relative to `folder`) and `labels.txt`; return the CSV path."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MANIFEST_NAME
    tmp = target.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for sample in samples:
            writer.writerow(
                (
                    sample.path.relative_to(folder).as_posix(),
                    labels[sample.label],
                    sample.split,
                    sample.sha256,
                    sample.source,
                )
            )
    tmp.replace(target)
    write_labels(folder / LABELS_NAME, list(labels))
    return target


def read_manifest(path: Path) -> Manifest:
    """Read a manifest folder (or its `manifest.csv`). Raises DataError if unusable."""
    folder = manifest_dir(path)
    csv_path = folder / MANIFEST_NAME
    labels_path = folder / LABELS_NAME
    if not csv_path.is_file() or not labels_path.is_file():
        raise DataError(
            f"no manifest in {folder}: expected {MANIFEST_NAME} and {LABELS_NAME} "
            "(run `python -m training prepare` first)"
        )
    try:
        labels = tuple(read_labels(labels_path))
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    index = {name: i for i, name in enumerate(labels)}
    samples: list[Sample] = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or tuple(reader.fieldnames) != MANIFEST_COLUMNS:
            raise DataError(f"{csv_path}: header must be {','.join(MANIFEST_COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            if row["label"] not in index:
                raise DataError(f"{csv_path}:{line}: label {row['label']!r} not in {labels_path}")
            if row["split"] not in SPLITS:
                raise DataError(f"{csv_path}:{line}: split {row['split']!r} is not train or val")
            samples.append(
                Sample(
                    path=folder / row["path"],
                    label=index[row["label"]],
                    split=row["split"],
                    sha256=row["sha256"],
                    source=row["source"],
                )
            )
    return Manifest(root=folder, labels=labels, samples=tuple(samples))


def load_rgb(path: Path) -> Image.Image:
    """Decode an image file into a loaded RGB image."""
    with Image.open(path) as img:
        return img.convert("RGB")


def serving_image(path: Path, size: int) -> torch.Tensor:
    """The service's decoding and preprocessing of one image file, as a uint8 CHW tensor.

    Raises the service's `ImageDecodeError` for a file it would refuse.
    """
    array = decode_image(path.read_bytes(), size=size, max_pixels=_MAX_PIXELS)
    # A copy: the decoder's array is a read-only view of the Pillow image.
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Augment:
    """Training augmentations. `crop_scale` is the area range of the random resized crop;
    `jitter` the brightness/contrast/saturation strength (0 turns colour jitter off)."""

    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    jitter: float = 0.2
    hue: float = 0.02


def train_transform(size: int, augment: Augment) -> ImageTransform:
    """Image file -> augmented uint8 CHW tensor of `size` x `size`."""
    steps: list[Callable[..., object]] = [
        v2.RandomResizedCrop(size, scale=augment.crop_scale, antialias=True)
    ]
    if augment.flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.jitter > 0 or augment.hue > 0:
        steps.append(
            v2.ColorJitter(
                brightness=augment.jitter,
                contrast=augment.jitter,
                saturation=augment.jitter,
                hue=augment.hue,
            )
        )
    steps.append(v2.PILToTensor())
    pipeline = v2.Compose(steps)

    def transform(path: Path) -> torch.Tensor:
        out = pipeline(load_rgb(path))
        assert isinstance(out, torch.Tensor)
        return out

    return transform


def eval_transform(size: int) -> ImageTransform:
    """Image file -> uint8 CHW tensor exactly as the service decodes and preprocesses it."""

    def transform(path: Path) -> torch.Tensor:
        return serving_image(path, size)

    return transform


def _key(*parts: int) -> int:
    # A stable 63-bit mix of small integers (Python's hash of ints is not salted, but a
    # multiply-xor keeps neighbouring keys far apart).
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = ((value ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Samples of a manifest as `(uint8 CHW tensor, label)`.

    Indexed by `(epoch, index)` (what `EpochSampler` yields) or by a plain index (epoch 0).
    The transform runs under a torch RNG seeded from (seed, epoch, index) and restored
    afterwards, so augmentation does not depend on worker count or process.
    """

    def __init__(self, samples: Sequence[Sample], transform: ImageTransform, *, seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        sample = self.samples[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_key(self.seed, epoch, index))
            tensor = self.transform(sample.path)
        return tensor, sample.label


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(epoch, index)`; the order of epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, size: int, *, seed: int, shuffle: bool) -> None:
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(_key(self.seed, self.epoch, 1))
            order: list[int] = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        for index in order:
            yield self.epoch, index


def default_workers() -> int:
    """Loader worker processes: one per available core, at most 32.

    Decoding and augmenting a 256 px JPEG takes a core a few milliseconds, while a GPU
    trains ResNet-34 at 112 px on thousands of images a second: it takes many workers to
    keep it fed (the per-epoch "waiting for data" share says whether they do).
    """
    return max(1, min(32, len(os.sched_getaffinity(0))))


def make_loader(
    dataset: ImageDataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool,
    drop_last: bool,
) -> DataLoader[tuple[torch.Tensor, int]]:
    """A loader that keeps the device fed: worker processes that outlive the epoch, batches
    prefetched ahead, pinned host memory for asynchronous copies to the GPU."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def normalize(images: torch.Tensor, arch: Arch = DEFAULT_ARCH) -> torch.Tensor:
    """uint8 NCHW batch -> float32 NCHW normalised as `arch` expects (what ServingModel does)."""
    mean_values, std_values = NORMALISATION[arch]
    mean = torch.tensor(mean_values, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std_values, device=images.device).view(1, 3, 1, 1)
    return (images.float().div_(255.0) - mean) / std
