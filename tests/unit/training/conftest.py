"""Shared, session-scoped training fixtures: one synthetic data set, prepared and trained once.

Training is the slow part (a ResNet-34 on the CPU), so evaluate and export tests reuse the
one run. Torch is held to two threads: the machines that run these tests are small.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.unit.training.helpers import PER_CLASS, Trained, tiny_config
from training.evaluate import Evaluation, evaluate
from training.prepare import prepare
from training.synthetic import generate
from training.train import train


@pytest.fixture(scope="session", autouse=True)
def _two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, previous))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared manifest of the synthetic five-class set, 32 photos per class."""
    root = tmp_path_factory.mktemp("synthetic")
    raw = generate(root / "raw", per_class=PER_CLASS, seed=0)
    prepare(raw, root / "data", stored_size=96, progress=False)
    return root / "data"


@pytest.fixture(scope="session")
def trained(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    started = time.perf_counter()
    result = train(tiny_config(prepared, tmp_path_factory.mktemp("run")))
    return Trained(manifest=prepared, result=result, seconds=time.perf_counter() - started)


@pytest.fixture(scope="session")
def evaluated(trained: Trained) -> Evaluation:
    checkpoint = trained.result.best_checkpoint
    return evaluate(checkpoint, trained.manifest, checkpoint.parent / "eval", progress=False)
