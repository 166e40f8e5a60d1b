"""The manifest, keyed randomness of the datasets, and agreement with the serving path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from category_suggester.preprocess import decode_image
from training.data import (
    Augment,
    EpochSampler,
    ImageDataset,
    Sample,
    eval_transform,
    make_loader,
    normalize,
    read_manifest,
    train_transform,
    write_manifest,
)
from training.errors import DataError
from training.model import ServingModel, build_model
from training.synthetic import draw_image


def _photos(folder: Path, count: int) -> list[Path]:
    import random

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        path = folder / f"{n}.jpg"
        draw_image(("books", "car")[n % 2], random.Random(n)).save(path, quality=90)
        paths.append(path)
    return paths


def test_manifest_round_trips(tmp_path: Path) -> None:
    paths = _photos(tmp_path / "images", 3)
    samples = [
        Sample(path=paths[0], label=0, split="train", sha256="a" * 64, source="books/x.jpg"),
        Sample(path=paths[1], label=1, split="val", sha256="b" * 64, source="http://h/y.jpg"),
        Sample(path=paths[2], label=1, split="train", sha256="c" * 64, source="car/z,1.jpg"),
    ]
    write_manifest(tmp_path, ["books", "car"], samples)
    loaded = read_manifest(tmp_path / "manifest.csv")
    assert loaded.labels == ("books", "car")
    assert list(loaded.samples) == samples
    assert [s.source for s in loaded.split("val")] == ["http://h/y.jpg"]
    assert "images/0.jpg" in (tmp_path / "manifest.csv").read_text()  # relative paths


def test_manifest_problems_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest"):
        read_manifest(tmp_path)
    (tmp_path / "labels.txt").write_text("books\ncar\n")
    (tmp_path / "manifest.csv").write_text("path,label,split,sha256,source\nx.jpg,boat,train,a,b\n")
    with pytest.raises(DataError, match="'boat' not in"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\nx.jpg,car\n")
    with pytest.raises(DataError, match="header"):
        read_manifest(tmp_path)


def test_epoch_sampler_is_keyed_by_seed_and_epoch() -> None:
    sampler = EpochSampler(50, seed=7, shuffle=True)
    first = list(sampler)
    assert sorted(index for _, index in first) == list(range(50))
    assert {epoch for epoch, _ in first} == {0}
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = [index for _, index in sampler]
    assert second != [index for _, index in first]
    again = EpochSampler(50, seed=7, shuffle=True)
    again.set_epoch(1)
    assert [index for _, index in again] == second
    assert [index for _, index in EpochSampler(5, seed=7, shuffle=False)] == [0, 1, 2, 3, 4]


def test_augmentation_depends_on_epoch_and_index_only(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 6)
    samples = [Sample(p, i % 2, "train", str(i), str(p)) for i, p in enumerate(paths)]
    dataset = ImageDataset(samples, train_transform(48, Augment()), seed=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = dataset[(2, 4)][0]
    assert torch.equal(torch.get_rng_state(), state), "the caller's RNG must be left alone"
    dataset[(0, 1)]
    assert torch.equal(dataset[(2, 4)][0], a)
    assert not torch.equal(dataset[(3, 4)][0], a)
    assert a.dtype == torch.uint8
    assert a.shape == (3, 48, 48)


def test_batches_are_the_same_with_and_without_worker_processes(tmp_path: Path) -> None:
    paths = _photos(tmp_path, 8)
    samples = [Sample(p, i % 2, "train", str(i), str(p)) for i, p in enumerate(paths)]
    dataset = ImageDataset(samples, train_transform(32, Augment()), seed=1)

    def first_epoch(workers: int) -> list[torch.Tensor]:
        sampler = EpochSampler(len(samples), seed=1, shuffle=True)
        sampler.set_epoch(2)
        loader = make_loader(
            dataset, sampler, batch_size=4, workers=workers, pin_memory=False, drop_last=False
        )
        return [images for images, _ in loader]

    in_process, with_workers = first_epoch(0), first_epoch(2)
    assert len(in_process) == 2
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a, b)


def test_eval_transform_is_the_services_decoding(tmp_path: Path) -> None:
    path = tmp_path / "wide.jpg"
    Image.effect_mandelbrot((300, 180), (-2, -1.2, 1, 1.2), 60).convert("RGB").save(path)
    got = eval_transform(112)(path)
    expected = decode_image(path.read_bytes(), size=112, max_pixels=40_000_000)
    assert got.shape == (3, 112, 112)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), expected)


def test_training_normalisation_is_the_serving_models() -> None:
    torch.manual_seed(0)
    classifier = build_model(3).eval()
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    with torch.no_grad():
        served = ServingModel(classifier).eval()(images.permute(0, 2, 3, 1).contiguous())
        trained = torch.softmax(classifier(normalize(images)), dim=1)
    torch.testing.assert_close(served, trained, rtol=1e-5, atol=1e-6)
