"""The real Triton Inference Server on a CPU machine, from the `nvidia-pytriton` wheel.

The wheel ships `tritonserver` with only the Python backend; the CPU model repository
(model_repository/cpu) serves the exported ONNX graph through it with onnxruntime.
`TritonServer(repository, state_dir).start()` builds a backend directory under
`state_dir` (the backend library plus the stub built for the environment's Python
version), launches the server detached and returns once the server and every requested
model are ready. Another process can `stop()` it through the pid file.

The server runs with `--model-control-mode=poll`: it rescans the repository every
`poll_secs` and loads a newly written version (training.repository.add_version renames a
complete version directory into place) and unloads the old one, with no restart and no
request lost. `poll_secs=None` loads the repository once at start.

Layout of `state_dir`:

    backends/python/    libtriton_python.so, triton_python_backend_utils.py and the stub
    tritonserver.log    the server's output (appended across runs)
    tritonserver.pid    the running server's pid

Raises `devstack.StackError` when the server cannot be prepared (no tritonserver, a Python
environment without numpy 1.x and onnxruntime), a port is taken, or the server exits or is
not ready in time (with the tail of its log).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from devstack.process import DetachedProcess, StackError, ensure_port_free

__all__ = ["TritonServer", "default_triton_home"]

_POLL_S = 0.2
_DEFAULT_ENV_BIN = Path(sys.executable).parent


def default_triton_home() -> Path:
    """`pytriton/tritonserver` of the installed nvidia-pytriton wheel."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("nvidia-pytriton is not installed; `pip install -e '.[stack]'`")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


class TritonServer:
    """One tritonserver process serving `model_repository`, listening on `host` only."""

    def __init__(
        self,
        model_repository: Path,
        state_dir: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        python_env_bin: Path = _DEFAULT_ENV_BIN,
        poll_secs: int | None = 5,
        triton_home: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.state_dir = Path(state_dir).resolve()
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        # Not resolved: a venv's bin/python is a symlink to the base interpreter, and it is
        # the venv's path that makes the embedded interpreter of the stub use the venv.
        self.python_env_bin = Path(python_env_bin).absolute()
        self.poll_secs = poll_secs
        self.triton_home = triton_home
        self.extra_args = tuple(extra_args)
        self.backend_dir = self.state_dir / "backends"
        self._process = DetachedProcess(
            "tritonserver",
            pid_file=self.state_dir / "tritonserver.pid",
            log_file=self.state_dir / "tritonserver.log",
        )

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP/REST endpoint, e.g. http://127.0.0.1:8000."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port of the gRPC endpoint, as tritonclient.grpc takes it."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus metrics page."""
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def log_file(self) -> Path:
        return self._process.log_file

    def is_running(self) -> bool:
        """Whether this state_dir's server process is alive (not whether it is ready)."""
        return self._process.is_running()

    def start(
        self, timeout_s: float = 120, models: Sequence[str] = ("category_classifier",)
    ) -> None:
        """Launch the server and wait until it and each of `models` report ready."""
        if self.is_running():
            raise StackError(f"tritonserver for {self.state_dir} is already running")
        if not self.model_repository.is_dir():
            raise StackError(f"model repository {self.model_repository} does not exist")
        for port, what in (
            (self.http_port, "Triton HTTP"),
            (self.grpc_port, "Triton gRPC"),
            (self.metrics_port, "Triton metrics"),
        ):
            ensure_port_free(port, what)
        home = self.triton_home or default_triton_home()
        binary = home / "bin" / "tritonserver"
        if not binary.is_file():
            raise StackError(f"{binary} does not exist")
        self._build_backend_dir(home)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_offset = self.log_file.stat().st_size if self.log_file.is_file() else 0
        self._process.start(self._command(home, binary), cwd=self.state_dir)
        try:
            self._wait_ready(timeout_s, models, log_offset)
        except BaseException:
            self._process.kill()
            raise

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the server (it finishes in-flight requests), SIGKILL after `timeout_s`."""
        self._process.stop(timeout_s)

    def kill(self) -> None:
        """SIGKILL the server now."""
        self._process.kill()

    def _command(self, home: Path, binary: Path) -> list[str]:
        # A clean, explicit environment: the stub's embedded Python finds the environment
        # through the first python3 on PATH, and the wheel's shared libraries are not on
        # the default search path once the backend is copied out of the wheel.
        env = {
            "PATH": os.pathsep.join(
                [str(self.python_env_bin), "/usr/local/bin", "/usr/bin", "/bin"]
            ),
            "LD_LIBRARY_PATH": str(home.parent.parent / "nvidia_pytriton.libs"),
            # A __pycache__ written into a version folder looks like a change to the
            # repository poller, which would load every new version twice.
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        if self.poll_secs is None:
            control = ["--model-control-mode=none"]
        else:
            control = ["--model-control-mode=poll", f"--repository-poll-secs={self.poll_secs}"]
        return [
            "/usr/bin/env",
            "-i",
            *(f"{key}={value}" for key, value in env.items()),
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.backend_dir}",
            *control,
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def _build_backend_dir(self, home: Path) -> None:
        version = self._env_python_version()
        stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            raise StackError(f"the wheel has no Python backend stub for Python {version}")
        python_dir = self.backend_dir / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        source = home / "backends" / "python"
        for path in (
            source / "libtriton_python.so",
            source / "triton_python_backend_utils.py",
            stub,
        ):
            shutil.copy2(path, python_dir / path.name)

    def _env_python_version(self) -> str:
        python = self.python_env_bin / "python3"
        probe = (
            "import sys, numpy, onnxruntime; "
            "print('%d.%d' % sys.version_info[:2], numpy.__version__.split('.')[0])"
        )
        result = subprocess.run(
            [str(python), "-c", probe], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise StackError(
                f"{python} cannot serve the CPU model (it needs numpy and onnxruntime):\n"
                f"{result.stderr.strip()}"
            )
        version, numpy_major = result.stdout.split()
        if int(numpy_major) >= 2:
            # The wheel's stub is built against numpy 1.x; with 2.x it returns empty outputs.
            raise StackError(f"{python} has numpy {numpy_major}.x; the Python backend needs 1.x")
        return version

    def _wait_ready(self, timeout_s: float, models: Sequence[str], log_offset: int) -> None:
        deadline = time.monotonic() + timeout_s
        paths = ["/v2/health/ready", *(f"/v2/models/{model}/ready" for model in models)]
        with httpx.Client(base_url=self.http_url, timeout=2.0) as client:
            for path in paths:
                while not self._answers_ok(client, path):
                    if not self._process.is_running():
                        raise StackError(
                            f"tritonserver exited (status {self._process.exit_code()}) before "
                            f"it was ready. {self._log_summary(log_offset)}"
                        )
                    if time.monotonic() >= deadline:
                        raise StackError(
                            f"tritonserver not ready ({path}) after {timeout_s:.0f} s. "
                            f"{self._log_summary(log_offset)}"
                        )
                    time.sleep(_POLL_S)

    def _log_summary(self, offset: int) -> str:
        """This run's error lines (a model's load failure is far above the tail) and tail."""
        with self.log_file.open("rb") as log:
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        # Triton's own log lines start with a severity letter and the date: E1129 15:17:14...
        errors = [line[:500] for line in lines if re.match(r"E\d{4} ", line)]
        return (
            f"Errors logged:\n{chr(10).join(errors) or '(none)'}\n"
            f"Last lines of {self.log_file}:\n{chr(10).join(lines[-12:])}"
        )

    @staticmethod
    def _answers_ok(client: httpx.Client, path: str) -> bool:
        try:
            return client.get(path).status_code == httpx.codes.OK
        except httpx.TransportError:
            return False
