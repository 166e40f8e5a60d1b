"""Errors the training commands raise on purpose.

Each one means the command cannot go on and says why in its message; the CLI prints the
message and exits with status 2. Anything else is a bug and keeps its traceback.

    TrainingError
    ├── DataError          the input data or manifest cannot be used (prepare, train, evaluate)
    ├── CheckpointError    a checkpoint is missing, unreadable or of another format
    ├── ParityError        the exported ONNX model disagrees with the PyTorch model
    ├── VersionExistsError export would overwrite a model version
    └── NoGPUError         a GPU-only command (TensorRT) ran where no GPU is present
"""

from __future__ import annotations


class TrainingError(Exception):
    """Base of every error the training commands raise on purpose."""


class DataError(TrainingError):
    """The input data or the manifest cannot be used."""


class CheckpointError(TrainingError):
    """A checkpoint is missing, unreadable or was written by something else."""


class ParityError(TrainingError):
    """The exported ONNX model's outputs differ from the PyTorch model's beyond tolerance."""


class VersionExistsError(TrainingError):
    """Writing would replace an existing model version; versions are immutable."""


class NoGPUError(TrainingError):
    """The command needs a CUDA GPU (and its libraries) and none is available."""
