"""train: learns a separable set in two epochs, checkpoints, resumes exactly, is seeded."""

from __future__ import annotations

import json
import logging
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from tests.unit.training.helpers import IMAGE_SIZE, Trained, tiny_config
from training.efficientnet import EfficientNetLite0, load_imagenet
from training.errors import CheckpointError
from training.model import Arch, build_model
from training.prepare import prepare
from training.synthetic import generate
from training.train import (
    BEST_NAME,
    LAST_NAME,
    initial_model,
    load_checkpoint,
    train,
)


def test_two_epochs_of_resnet34_learn_a_separable_set_well_above_chance(trained: Trained) -> None:
    result = trained.result
    print(f"two epochs of ResNet-34 at {IMAGE_SIZE} px on the CPU: {trained.seconds:.1f} s")
    chance = 1 / 5
    assert result.best_val_accuracy >= 3 * chance
    assert [row.epoch for row in result.history] == [1, 2]
    assert result.history[1].train_loss < result.history[0].train_loss
    assert all(row.images_per_s > 0 for row in result.history)
    assert result.initialisation == "random initialisation"
    best = max(result.history, key=lambda row: row.val_accuracy)
    assert result.best_epoch == best.epoch


def test_run_folder_holds_checkpoints_history_and_labels(trained: Trained) -> None:
    run = trained.result.best_checkpoint.parent
    assert (run / "labels.txt").read_text().split() == [
        "books", "car", "furniture", "mobile", "motorcycle",
    ]  # fmt: skip
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"val_accuracy", "train_loss", "images_per_s", "lr"} <= history[0].keys()
    config = json.loads((run / "train_config.json").read_text())
    assert config["image_size"] == IMAGE_SIZE
    assert config["weights"] == "none"
    assert history[1]["lr"] == pytest.approx(history[0]["lr"] * 0.9)  # exponential decay

    best = load_checkpoint(run / BEST_NAME)
    assert best.labels[0] == "books"
    assert best.image_size == IMAGE_SIZE
    assert best.meta["val_accuracy"] == trained.result.best_val_accuracy
    assert not best.classifier.training
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(run / "nothing.pt")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    raw = generate(root / "raw", per_class=6, labels=["books", "car", "mobile"])
    prepare(raw, root / "data", stored_size=48, progress=False)
    return root / "data"


def _states_equal(a: Path, b: Path) -> bool:
    first = torch.load(a, weights_only=True)["model_state"]
    second = torch.load(b, weights_only=True)["model_state"]
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_same_seed_same_weights_and_resume_continues_exactly(
    small_set: Path, tmp_path: Path
) -> None:
    small = {"image_size": 32, "batch_size": 4}
    train(tiny_config(small_set, tmp_path / "straight", **small))
    train(tiny_config(small_set, tmp_path / "again", **small))
    assert _states_equal(tmp_path / "straight" / LAST_NAME, tmp_path / "again" / LAST_NAME)

    train(tiny_config(small_set, tmp_path / "resumed", epochs=1, **small))
    resumed = train(
        tiny_config(
            small_set, tmp_path / "resumed", resume=tmp_path / "resumed" / LAST_NAME, **small
        )
    )
    assert [row.epoch for row in resumed.history] == [1, 2]
    assert _states_equal(tmp_path / "straight" / LAST_NAME, tmp_path / "resumed" / LAST_NAME)

    train(tiny_config(small_set, tmp_path / "other-seed", seed=1, **small))
    assert not _states_equal(tmp_path / "straight" / LAST_NAME, tmp_path / "other-seed" / LAST_NAME)


def test_resume_refuses_a_checkpoint_that_does_not_fit(small_set: Path, tmp_path: Path) -> None:
    train(tiny_config(small_set, tmp_path / "run", epochs=1, image_size=32, batch_size=4))
    with pytest.raises(CheckpointError, match="trained at 32 px"):
        train(
            tiny_config(
                small_set, tmp_path / "run", image_size=48, resume=tmp_path / "run" / LAST_NAME
            )
        )
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(
            tiny_config(
                small_set, tmp_path / "run", image_size=32, resume=tmp_path / "run" / BEST_NAME
            )
        )


def test_unreachable_resnet_weights_stop_and_name_the_offline_backbone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = build_model

    def offline(num_classes: int, *, arch: Arch = "resnet34", weights: object = None) -> nn.Module:
        if weights == "imagenet" and arch == "resnet34":
            raise urllib.error.URLError("Name or service not known")
        return real(num_classes, arch=arch, weights=weights)  # type: ignore[arg-type]

    monkeypatch.setattr("training.train.build_model", offline)
    with pytest.raises(CheckpointError) as raised:
        initial_model("imagenet", 5)
    message = str(raised.value)
    assert "Name or service not known" in message
    assert "--arch efficientnet_lite0" in message
    assert "--weights none" in message
    # The offline backbone needs no network.
    model, origin = initial_model("imagenet", 5, "efficientnet_lite0")
    assert origin == "ImageNet (installed)"
    assert isinstance(model, EfficientNetLite0)


def test_from_scratch_only_when_asked_and_loudly(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        model, origin = initial_model("none", 5, "efficientnet_lite0")
    assert origin == "random initialisation"
    assert "FROM SCRATCH" in caplog.text
    assert isinstance(model, EfficientNetLite0)


def test_efficientnet_trains_with_a_frozen_backbone_and_loads_back(
    small_set: Path, tmp_path: Path
) -> None:
    before = load_imagenet(3).state_dict()
    result = train(
        tiny_config(
            small_set,
            tmp_path / "run",
            arch="efficientnet_lite0",
            weights="imagenet",
            freeze_backbone=True,
            epochs=1,
            image_size=64,
        )
    )
    ckpt = load_checkpoint(result.best_checkpoint)
    assert ckpt.arch == "efficientnet_lite0"
    after = ckpt.classifier.state_dict()
    # Frozen: the stem and early blocks, their batch-norm statistics included.
    for key in ("_conv_stem.weight", "_blocks.3._bn1.running_mean", "_blocks.13._bn2.weight"):
        assert torch.equal(after[key], before[key]), key
    # Trained: the last stage and the head.
    assert not torch.equal(after["_blocks.15._project_conv.weight"],
                           before["_blocks.15._project_conv.weight"])  # fmt: skip
    assert ckpt.serving_model().mean.flatten().tolist() == pytest.approx([127 / 255] * 3)


def test_a_local_imagenet_file_gives_the_backbone_and_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    imagenet_like = torchvision.models.resnet34(weights=None)  # 1000 classes
    path = tmp_path / "resnet34-local.pth"
    torch.save(imagenet_like.state_dict(), path)
    model, origin = initial_model(str(path), 5)
    assert origin == f"file {path}"
    state = model.state_dict()
    assert torch.equal(
        state["layer4.2.conv2.weight"], imagenet_like.state_dict()["layer4.2.conv2.weight"]
    )
    assert state["fc.weight"].shape == (5, 512)

    torch.save({"conv1.weight": torch.zeros(3), "fc.weight": torch.zeros(5, 512)}, path)
    with pytest.raises(CheckpointError, match="does not fit ResNet-34"):
        initial_model(str(path), 5)
    with pytest.raises(CheckpointError, match="does not exist"):
        initial_model(str(tmp_path / "missing.pth"), 5)
