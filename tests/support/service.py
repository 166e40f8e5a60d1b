"""A service process under test: `python -m category_suggester run` with its own environment."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO


class ServiceProcess:
    def __init__(self, argv: Sequence[str], *, env: dict[str, str], log_path: Path, cwd: Path):
        self.argv = list(argv)
        self.env = env
        self.log_path = log_path
        self.cwd = cwd
        self.port = int(env["SUGGESTER_OBSERVABILITY__PORT"])
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT
        )

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Wait until /readyz answers 200 (model ready, partitions assigned)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.exit_code() is not None:
                raise AssertionError(f"service exited with {self.exit_code()}:\n{self.log_tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)  # polling a probe, not synchronising on time
        raise AssertionError(f"service not ready within {timeout_s} s:\n{self.log_tail()}")

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200
        return body

    def exit_code(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def terminate(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        return self._process.wait(timeout_s)

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
            self._process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
