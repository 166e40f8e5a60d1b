"""`python -m bench.model OUT.onnx [SIZE]`: export a seeded random ResNet-34 serving graph.
`python -m bench.model --cold-start`: print the path of the cold-start (zero-shot) model's
ONNX file, built and cached by training.zero_shot.

The benchmark measures speed, not accuracy: a random model does the same work per image
as a trained one. Run in a child process by bench.stack so that torch stays out of the
harness.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from training.model import DEFAULT_LABELS, build_model, export_onnx


def main(argv: list[str]) -> int:
    if argv == ["--cold-start"]:
        from training.zero_shot import zero_shot_onnx

        print(zero_shot_onnx()[0])
        return 0
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    size = int(argv[1]) if len(argv) > 1 else 112
    torch.manual_seed(0)
    classifier = build_model(len(DEFAULT_LABELS))
    export_onnx(classifier, Path(argv[0]), image_size=size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
