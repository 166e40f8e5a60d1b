"""The stack the benchmark measures, started on free loopback ports in a work folder.

- Kafka: a broker of its own (devstack.kafka), or an existing one (`bootstrap`), in which
  the harness only creates topics of its own (`bench.<run>.<random>`).
- Triton: `tritonserver` from the nvidia-pytriton wheel (devstack.triton) over a model
  repository assembled in the work folder: the committed CPU repository plus one version
  (a given ONNX file, or a seeded random ResNet-34 exported once and cached: the weights
  do not change the work a forward pass does), or the identity model of
  model_repository/cpu-identity for the overhead run. An external server (`--triton-url`,
  e.g. a GPU server) is used as it is.
- The image origin (bench.origin) as a child process.
- The service, `python -m category_suggester run`, one process per run, configured only through its
  `SUGGESTER_*` environment like in production.

Everything started here is stopped by `close()` (also on errors: use it as a context
manager). Raises `devstack.process.StackError` when a server cannot start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

import httpx

from devstack.kafka import KafkaBroker
from devstack.process import StackError, free_port
from devstack.triton import TritonServer

REPO_ROOT = Path(__file__).resolve().parent.parent
CPU_REPOSITORY = REPO_ROOT / "model_repository" / "cpu"
GPU_REPOSITORY = REPO_ROOT / "model_repository" / "gpu"
IDENTITY_REPOSITORY = REPO_ROOT / "model_repository" / "cpu-identity"
MODEL_NAME = "category_classifier"
IMAGE_SIZE = 112


@dataclass(frozen=True)
class TritonEndpoint:
    """Where a Triton server answers, and its pid when it runs on this machine."""

    grpc_url: str
    metrics_url: str
    pid: int | None
    description: str


def _pid_from_file(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def model_cache_key() -> str:
    """Changes when the model definition or its export changes."""
    digest = hashlib.sha256((REPO_ROOT / "training" / "model.py").read_bytes())
    return digest.hexdigest()[:16]


def random_model_onnx(cache_dir: Path) -> Path:
    """A seeded, randomly initialised serving graph as ONNX, exported once and cached."""
    target = cache_dir / f"resnet34-random-{IMAGE_SIZE}-{model_cache_key()}.onnx"
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.stem + ".partial.onnx")
    # Exported in a child process: torch stays out of the harness, whose CPU is not measured
    # but shares the machine.
    result = subprocess.run(
        [sys.executable, "-m", "bench.model", str(partial), str(IMAGE_SIZE)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"exporting the benchmark model failed:\n{result.stderr[-3000:]}")
    partial.replace(target)
    return target


def cold_start_onnx() -> Path:
    """The cold-start model `make stack` serves (zero-shot EfficientNet-Lite0, 224 px), as
    ONNX: built once by training.zero_shot in a child process and cached there."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.model", "--cold-start"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"building the cold-start model failed:\n{result.stderr[-3000:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def cpu_repository(workdir: Path, onnx: Path) -> Path:
    """The committed CPU repository plus version 1 = `onnx` (its image size read from the
    file), under `workdir`."""
    from training.model import read_labels, read_onnx_contract
    from training.repository import add_version

    root = workdir / "model_repository"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(
        CPU_REPOSITORY, root / "cpu", ignore=lambda _d, names: [n for n in names if n.isdigit()]
    )
    labels = read_labels(CPU_REPOSITORY / MODEL_NAME / "labels.txt")
    add_version(root, "cpu", onnx, labels, image_size=read_onnx_contract(onnx).image_size)
    return root / "cpu"


def identity_repository(workdir: Path) -> Path:
    """model_repository/cpu-identity with its Python model installed as version 1."""
    root = workdir / "identity_repository"
    if root.exists():
        shutil.rmtree(root)
    model = root / MODEL_NAME
    shutil.copytree(
        IDENTITY_REPOSITORY / MODEL_NAME,
        model,
        ignore=lambda _d, names: [n for n in names if n.isdigit()],
    )
    (model / "1").mkdir()
    shutil.copyfile(model / "identity_model.py", model / "1" / "model.py")
    return root


class ServiceProcess:
    """One `python -m category_suggester run` process with its own environment and log file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = int(env["SUGGESTER_OBSERVABILITY__PORT"])
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "category_suggester", "run"],
            env=dict(env),
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self._process.pid

    def exit_code(self) -> int | None:
        return self._process.poll()

    def wait_ready(self, timeout_s: float = 120) -> None:
        """Wait for /readyz 200 (model ready, partitions assigned); raise StackError if not."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.port}/readyz"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.exit_code() is not None:
                    raise StackError(
                        f"the service exited with {self.exit_code()}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(url).status_code == httpx.codes.OK:
                        return
                time.sleep(0.2)  # polling a readiness probe: it has no notification
        raise StackError(f"the service was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._log.close()
        return self._process.returncode

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


class Origin:
    """bench.origin as a child process, serving `folder`."""

    def __init__(self, folder: Path, workdir: Path, *, latency_ms: float, jitter_ms: float,
                 mbps: float) -> None:  # fmt: skip
        self.folder = folder
        port_file = workdir / "origin.port"
        port_file.unlink(missing_ok=True)
        self._log = (workdir / "origin.log").open("ab")
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.origin",
                "--folder",
                str(folder),
                "--port-file",
                str(port_file),
                "--latency-ms",
                str(latency_ms),
                "--jitter-ms",
                str(jitter_ms),
                "--mbps",
                str(mbps),
            ],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while not port_file.is_file():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StackError(f"the image origin did not start; see {workdir / 'origin.log'}")
            time.sleep(0.05)  # the port file appears once the origin listens
        self.port = int(port_file.read_text())
        self.host_port = f"127.0.0.1:{self.port}"
        self._client = httpx.Client(base_url=f"http://{self.host_port}", timeout=5.0)

    @property
    def pid(self) -> int:
        return self._process.pid

    def url(self, name: str) -> str:
        return f"http://{self.host_port}/{name}"

    def configure(self, *, latency_ms: float, jitter_ms: float, mbps: float) -> None:
        params = {"latency_ms": latency_ms, "jitter_ms": jitter_ms, "mbps": mbps}
        self._client.get("/_/config", params=params).raise_for_status()

    def reset(self) -> None:
        self._client.get("/_/reset").raise_for_status()

    def stats(self) -> dict[str, float]:
        response = self._client.get("/_/stats")
        response.raise_for_status()
        stats: dict[str, float] = response.json()
        return stats

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        self._log.close()


class BenchStack:
    """Kafka, the image origin and Triton servers for one benchmark invocation."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap = ""
        self._broker: KafkaBroker | None = None
        self._tritons: list[TritonServer] = []
        self.origin: Origin | None = None

    def start_kafka(self, bootstrap: str | None) -> str:
        """Use the broker at `bootstrap`, or start one; return the bootstrap servers."""
        if bootstrap:
            self.bootstrap = bootstrap
            return bootstrap
        broker = KafkaBroker(
            self.workdir / "kafka", port=free_port(), controller_port=free_port(), heap="768m"
        )
        broker.start()
        self._broker = broker
        self.bootstrap = broker.bootstrap_servers
        return self.bootstrap

    @property
    def kafka_pid(self) -> int | None:
        if self._broker is None:
            return None
        return _pid_from_file(self._broker.state_dir / "kafka.pid")

    def start_origin(self, folder: Path, *, latency_ms: float, jitter_ms: float,
                     mbps: float) -> Origin:  # fmt: skip
        self.origin = Origin(
            folder, self.workdir, latency_ms=latency_ms, jitter_ms=jitter_ms, mbps=mbps
        )
        return self.origin

    def start_triton(self, repository: Path, name: str) -> TritonEndpoint:
        """Start a local tritonserver over `repository` and wait until the model is ready."""
        server = TritonServer(
            repository,
            self.workdir / f"triton-{name}",
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            poll_secs=None,
        )
        server.start(timeout_s=180)
        self._tritons.append(server)
        pid = _pid_from_file(server.state_dir / "tritonserver.pid")
        return TritonEndpoint(
            server.grpc_url, server.metrics_url, pid, f"local tritonserver ({repository.name})"
        )

    def stop_last_triton(self) -> None:
        """Stop the tritonserver started last (the others keep running)."""
        if self._tritons:
            self._tritons.pop().stop()

    def stop_tritons(self) -> None:
        while self._tritons:
            self._tritons.pop().stop()

    def service_env(
        self,
        *,
        triton_url: str,
        input_topic: str,
        output_topic: str,
        dlq_topic: str,
        group: str,
        overrides: Mapping[str, str],
    ) -> dict[str, str]:
        assert self.origin is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUGGESTER_")}
        env.update(
            {
                "SUGGESTER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
                "SUGGESTER_KAFKA__INPUT_TOPIC": input_topic,
                "SUGGESTER_KAFKA__OUTPUT_TOPIC": output_topic,
                "SUGGESTER_KAFKA__DLQ_TOPIC": dlq_topic,
                "SUGGESTER_KAFKA__GROUP_ID": group,
                "SUGGESTER_TRITON__URL": triton_url,
                "SUGGESTER_FETCH__ALLOWED_HOSTS": self.origin.host_port,
                "SUGGESTER_OBSERVABILITY__HOST": "127.0.0.1",
                "SUGGESTER_OBSERVABILITY__PORT": str(free_port()),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(overrides)
        return env

    def close(self) -> None:
        errors: list[str] = []
        if self.origin is not None:
            self.origin.stop()
        for server in reversed(self._tritons):
            try:
                server.stop()
            except StackError as exc:
                errors.append(str(exc))
        self._tritons.clear()
        if self._broker is not None:
            try:
                self._broker.stop()
            except StackError as exc:
                errors.append(str(exc))
        if errors:
            raise StackError("; ".join(errors))

    def __enter__(self) -> BenchStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def running_service(env: Mapping[str, str], log_path: Path) -> Iterator[ServiceProcess]:
    """A service process that is stopped (SIGTERM, then SIGKILL) when the block ends."""
    service = ServiceProcess(env, log_path)
    try:
        yield service
    finally:
        service.stop()
