"""Session fixtures: one real Kafka broker, one real Triton server, an image origin.

They start once per test run on free loopback ports, in a temporary folder, so a running
`make stack` is never touched. A server that cannot start fails every test that needs it
with the reason; nothing is skipped. Each test gets its own topics and consumer group.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack.kafka import KafkaBroker
from devstack.process import StackError, free_port
from devstack.triton import TritonServer
from tests.support.origin import ImageOrigin
from tests.support.service import ServiceProcess

ServiceFactory = Callable[..., ServiceProcess]

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_REPOSITORY = REPO_ROOT / "model_repository" / "cpu"


@dataclass(frozen=True)
class ServedModel:
    repository: Path
    onnx_path: Path
    labels: list[str]
    image_size: int
    version: int
    confidence_threshold: float


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str
    partitions: int


@pytest.fixture(scope="session")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def kafka(stack_dir: Path) -> Iterator[KafkaBroker]:
    broker = KafkaBroker(stack_dir / "kafka", port=free_port(), controller_port=free_port())
    try:
        broker.start()
    except StackError as exc:
        pytest.fail(f"the test Kafka broker could not start: {exc}", pytrace=False)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def served_model(stack_dir: Path) -> ServedModel:
    """A CPU model repository serving the zero-shot cold-start model, as `make stack` does.

    Built once per machine and cached (training/zero_shot.py): seconds after the first run.
    """
    from training.model import read_labels, read_onnx_contract
    from training.repository import CONFIDENCE_THRESHOLD_PARAMETER, add_version
    from training.zero_shot import zero_shot_onnx

    repository = stack_dir / "model_repository"
    # The committed configs only: versions built locally (numbered folders) stay behind.
    shutil.copytree(
        CPU_REPOSITORY,
        repository / "cpu",
        ignore=lambda _dir, names: [n for n in names if n.isdigit()],
    )
    labels = read_labels(CPU_REPOSITORY / "category_classifier" / "labels.txt")
    onnx_path, parameters = zero_shot_onnx(labels)
    size = read_onnx_contract(onnx_path).image_size
    version = add_version(
        repository, "cpu", onnx_path, labels, image_size=size, parameters=parameters
    )
    threshold = float(parameters[CONFIDENCE_THRESHOLD_PARAMETER])
    return ServedModel(repository / "cpu", onnx_path, labels, size, version, threshold)


@pytest.fixture(scope="session")
def triton(stack_dir: Path, served_model: ServedModel) -> Iterator[TritonServer]:
    server = TritonServer(
        served_model.repository,
        stack_dir / "triton",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    try:
        server.start()
    except StackError as exc:
        pytest.fail(f"the test Triton server could not start: {exc}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def image_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageOrigin]:
    origin = ImageOrigin(tmp_path_factory.mktemp("origin"))
    origin.start()
    yield origin
    origin.stop()


@pytest.fixture
def topics(request: pytest.FixtureRequest, kafka: KafkaBroker) -> Topics:
    """Fresh topics and a consumer group named after the test."""
    name = request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:80]
    base = f"pytest_{name}_{uuid.uuid4().hex[:8]}"
    partitions = 6
    topics = Topics(
        input=base,
        output=f"{base}.suggestions",
        dlq=f"{base}.dlq",
        group=f"{base}.group",
        partitions=partitions,
    )
    kafka.create_topics({topics.input: partitions, topics.output: partitions, topics.dlq: 1})
    return topics


@pytest.fixture
def service_env(
    kafka: KafkaBroker, triton: TritonServer, topics: Topics, image_origin: ImageOrigin
) -> dict[str, str]:
    """Environment for a service process wired to the test stack and this test's topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUGGESTER_")}
    env.update(
        {
            "SUGGESTER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "SUGGESTER_KAFKA__INPUT_TOPIC": topics.input,
            "SUGGESTER_KAFKA__OUTPUT_TOPIC": topics.output,
            "SUGGESTER_KAFKA__DLQ_TOPIC": topics.dlq,
            "SUGGESTER_KAFKA__GROUP_ID": topics.group,
            "SUGGESTER_TRITON__URL": triton.grpc_url,
            "SUGGESTER_FETCH__ALLOWED_HOSTS": image_origin.host_port,
            "SUGGESTER_OBSERVABILITY__HOST": "127.0.0.1",
            "SUGGESTER_CONSUMER__SHUTDOWN_GRACE_S": "20",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceFactory]:
    """Start `python -m category_suggester run` processes; those still running are killed after."""
    started: list[ServiceProcess] = []

    def start(**overrides: str) -> ServiceProcess:
        env = service_env | {"SUGGESTER_OBSERVABILITY__PORT": str(free_port())} | overrides
        process = ServiceProcess(
            [sys.executable, "-m", "category_suggester", "run"],
            env=env,
            log_path=tmp_path / f"service-{len(started)}.log",
            cwd=REPO_ROOT,
        )
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.kill()
