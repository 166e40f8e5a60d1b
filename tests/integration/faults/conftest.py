"""Fixtures of the fault tests, and the end-of-run summary of their ledgers.

In this folder `triton` is a Triton server of its own (started once per run) serving
fault_model.py under the model contract: it answers in microseconds, so the tests move
thousands of events on a two-core machine, and a test can slow it down (`slow_triton`).
The session's Kafka broker, image origin, topics and `start_service` are the suite's own
(tests/conftest.py); `start_service` wires the services to this Triton.

Every test appends a `FaultRecord` to `fault_records`; the summary at the end of the run
prints them all: lost, duplicated and DLQ by reason for each fault.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.process import StackError, free_port
from devstack.triton import TritonServer
from tests.integration.faults.harness import FaultRecord

REPO_ROOT = Path(__file__).resolve().parents[3]
LABELS = REPO_ROOT / "model_repository" / "cpu" / "category_classifier" / "labels.txt"
MODEL_SOURCE = Path(__file__).resolve().parent / "fault_model.py"
RECORDS = pytest.StashKey[list[FaultRecord]]()

_CONFIG = """\
name: "category_classifier"
backend: "python"
max_batch_size: 64
input [ { name: "image", data_type: TYPE_UINT8, dims: [ 112, 112, 3 ] } ]
output [
  { name: "probabilities", data_type: TYPE_FP32, dims: [ %d ], label_filename: "labels.txt" }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
"""


@pytest.fixture(scope="session")
def fault_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model's folder in a repository of its own; a `delay_s` file here slows it."""
    model = tmp_path_factory.mktemp("fault_repository") / "category_classifier"
    (model / "1").mkdir(parents=True)
    labels = [line for line in LABELS.read_text().splitlines() if line.strip()]
    (model / "config.pbtxt").write_text(_CONFIG % len(labels))
    shutil.copy(LABELS, model / "labels.txt")
    shutil.copy(MODEL_SOURCE, model / "1" / "model.py")
    return model


@pytest.fixture(scope="session")
def triton(stack_dir: Path, fault_model_dir: Path) -> Iterator[TritonServer]:
    server = TritonServer(
        fault_model_dir.parent,
        stack_dir / "fault-triton",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        poll_secs=None,
    )
    try:
        server.start()
    except StackError as exc:
        pytest.fail(f"the fault tests' Triton server could not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def slow_triton(fault_model_dir: Path) -> Iterator[Path]:
    """The file whose content (seconds) delays every batch; removed after the test."""
    delay = fault_model_dir / "delay_s"
    yield delay
    delay.unlink(missing_ok=True)


@pytest.fixture
def fault_records(request: pytest.FixtureRequest) -> list[FaultRecord]:
    return request.config.stash.setdefault(RECORDS, [])


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    records = config.stash.get(RECORDS, [])
    if not records:
        return
    terminalreporter.section("fault ledgers")
    for record in records:
        terminalreporter.write_line(record.line())
    cache = getattr(config, "cache", None)
    if cache is not None:
        out = Path(cache.mkdir("faults")) / "ledgers.json"
        out.write_text(
            json.dumps(
                [
                    {"fault": r.fault, "mode": r.mode, **r.totals.as_dict(), **r.numbers}
                    for r in records
                ],
                indent=2,
            )
        )
        terminalreporter.write_line(f"(as JSON: {out})")
