"""EfficientNet-Lite0, the ImageNet-to-category mapping, the fold and the zero-shot model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from training.data import serving_image
from training.efficientnet import EfficientNetLite0, SamePadConv2d, load_imagenet
from training.errors import DataError
from training.model import (
    BACKGROUND_LABEL,
    DEFAULT_LABELS,
    ServingModel,
    background_fold,
    fold_matrix,
    read_labels,
    read_onnx_contract,
    served_labels,
)
from training.repository import bootstrap, committed_config, model_dir, served_description
from training.zero_shot import (
    CATEGORY_MAP,
    CATEGORY_MAP_COLUMNS,
    IMAGENET_LABELS,
    PHOTOS,
    read_category_map,
    zero_shot_checkpoint,
    zero_shot_onnx,
)


def test_same_padding_halves_like_tensorflow() -> None:
    conv = SamePadConv2d(1, 1, 5, stride=2, bias=False)
    for size in (224, 225, 7, 8):
        out = conv(torch.zeros(1, 1, size, size))
        assert out.shape[-1] == -(-size // 2)
    # An even input with a 3x3 stride-2 kernel pads only bottom/right, as TensorFlow does:
    # the first output sees pixels 0..2, not a zero column.
    conv3 = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    nn.init.ones_(conv3.weight)
    x = torch.zeros(1, 1, 4, 4)
    x[..., 0, 0] = 1.0
    assert conv3(x)[0, 0, 0, 0] == 1.0


def test_the_installed_weights_load_key_for_key() -> None:
    model = load_imagenet()
    assert isinstance(model, EfficientNetLite0)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    assert load_imagenet(7)._fc.out_features == 7


def test_imagenet_predictions_on_real_photos_are_sensible() -> None:
    """A car photo's top ImageNet classes are cars, a motorbike's mopeds or scooters."""
    names = read_labels(IMAGENET_LABELS)
    model = load_imagenet().eval()
    serving = ServingModel(model, arch="efficientnet_lite0")
    for folder, expected in (("car", "car"), ("motorcycle", "motorcycle")):
        path = sorted((PHOTOS / folder).glob("*.jpg"))[0]
        image = serving_image(path, 224).permute(1, 2, 0)[None]
        with torch.no_grad():
            probabilities = serving(image)[0]
        top = names[int(probabilities.argmax())]
        assert top in {name for name, category in _mapping_rows() if category == expected}, top


def _mapping_rows() -> list[tuple[str, str]]:
    with CATEGORY_MAP.open(newline="") as handle:
        return [(row["imagenet_class"], row["category"]) for row in csv.DictReader(handle)]


def test_the_mapping_file_is_valid_and_covers_every_category() -> None:
    names = read_labels(IMAGENET_LABELS)
    assert len(names) == 1000
    with CATEGORY_MAP.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    indices = [int(row["index"]) for row in rows]
    assert len(indices) == len(set(indices)), "an ImageNet class in two categories"
    for row in rows:
        assert names[int(row["index"])] == row["imagenet_class"]
    mapping = read_category_map()
    assert sorted(mapping) == sorted(DEFAULT_LABELS)
    assert all(mapping.values())
    # Deliberate choices (training/README.md): a bookcase is furniture, a remote control
    # or a landline is no mobile phone.
    assert names.index("bookcase") in mapping["furniture"]
    assert not {names.index("remote control"), names.index("dial telephone")} & {
        i for members in mapping.values() for i in members
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1000,nothing,car", "no ImageNet class"),
        ("436,sports car,car", "not 'sports car'"),
        ("436,beach wagon,furniture", "in 'car' and 'furniture'"),
        ("x,beach wagon,car", "no number"),
    ],
)
def test_a_bad_mapping_is_refused(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "map.csv"
    path.write_text(",".join(CATEGORY_MAP_COLUMNS) + "\n436,beach wagon,car\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_category_map(path)


def test_the_fold_sums_to_one_keeps_the_argmax_and_spreads_unmapped_mass() -> None:
    fold = fold_matrix([[0, 1], [2], [3]], num_sources=6)
    logits = torch.tensor(
        [
            [5.0, 4.0, 0.0, 0.0, 0.0, 0.0],  # mostly category 0
            [0.0, 0.0, 0.0, 0.0, 9.0, 9.0],  # none of the categories
        ]
    )

    class Fixed(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return logits[: x.shape[0]]

    serving = ServingModel(Fixed(), fold=fold)
    out = serving(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    q = torch.softmax(logits, dim=1)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2))
    unmapped = q[0, 4:].sum()
    torch.testing.assert_close(out[0, 0], q[0, 0] + q[0, 1] + unmapped / 3)
    assert int(out[0].argmax()) == 0
    # Nearly all mass unmapped: every category near 1/3, none confident.
    assert float(out[1].max()) < 1 / 3 + 0.01
    with pytest.raises(ValueError, match="two categories"):
        fold_matrix([[0], [0]], 2)
    with pytest.raises(ValueError, match="outside"):
        fold_matrix([[2]], 2)


def test_the_background_class_is_folded_away() -> None:
    labels = ["car", "mobile", BACKGROUND_LABEL, "motorcycle"]
    assert served_labels(labels) == ["car", "mobile", "motorcycle"]
    fold = background_fold(labels)
    assert fold is not None
    q = torch.tensor([[0.1, 0.2, 0.6, 0.1]])
    mapped = q @ fold
    torch.testing.assert_close(mapped + (1 - mapped.sum()) / 3, torch.tensor([[0.3, 0.4, 0.3]]))
    assert background_fold(["car", "mobile"]) is None


def test_zero_shot_export_keeps_the_contract_and_matches_pytorch() -> None:
    onnx_path, parameters = zero_shot_onnx()
    contract = read_onnx_contract(onnx_path)
    assert (contract.image_size, contract.num_classes) == (224, len(DEFAULT_LABELS))
    assert 0 < float(parameters["confidence_threshold"]) < 1
    assert "zero-shot" in parameters["model_description"]
    ckpt = zero_shot_checkpoint()
    photos = [sorted((PHOTOS / name).glob("*.jpg"))[1] for name in ("car", "furniture")]
    images = np.stack([serving_image(p, 224).permute(1, 2, 0).numpy() for p in photos])
    with torch.no_grad():
        expected = ckpt.serving_model()(torch.from_numpy(images)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert [DEFAULT_LABELS[i] for i in got.argmax(axis=1)] == ["car", "furniture"]


def test_bootstrap_serves_the_zero_shot_model_and_random_only_when_asked(tmp_path: Path) -> None:
    zero_shot, random = tmp_path / "zero-shot", tmp_path / "random"
    assert bootstrap(zero_shot) == {"cpu": 1, "gpu": 1}
    for kind in ("cpu", "gpu"):
        config = (model_dir(zero_shot, kind) / "config.pbtxt").read_text()
        assert "dims: [ 224, 224, 3 ]" in config
        assert 'key: "confidence_threshold"' in config
        assert "zero-shot" in (served_description(zero_shot, kind) or "")
        # What a fresh clone's `make run` writes is what is committed: the tree stays clean.
        assert config == committed_config(kind)
    assert bootstrap(random, model="random") == {"cpu": 1, "gpu": 1}
    assert "RANDOMLY INITIALISED" in (served_description(random, "cpu") or "")
    assert (
        'key: "confidence_threshold"' not in (model_dir(random, "cpu") / "config.pbtxt").read_text()
    )
