"""Run Python in a fresh interpreter from the repository root, as a command line would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_python(
    *argv: str, timeout_s: float = 120, env: Mapping[str, str] | None = None, status: int = 0
) -> subprocess.CompletedProcess[str]:
    """`python ARGV` (e.g. `-m training demo`, `-c CODE`); asserts that it exits with
    `status`, with the tail of its stderr in the failure message. Returns its output."""
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == status, done.stderr[-4000:]
    return done
