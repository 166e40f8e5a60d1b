"""Fixtures for the dashboard tests.

`prometheus(targets)` starts a real Prometheus scraping {job: [host:port, ...]} (use the
job names the rules and the dashboard use: "category-suggester", "triton"); every one
started stops after the test.

`running_service_metrics_url` and `triton_metrics_url` are the metrics pages of the
service started for this test (on the test's own topics) and of the session's Triton.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.triton import TritonServer
from tests.conftest import ServiceFactory
from tests.integration.deploy.prometheus_server import PrometheusFactory, PrometheusServer


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Start Prometheus servers scraping {job: [host:port, ...]}; all stop after the test."""
    started: list[PrometheusServer] = []

    def start(targets: dict[str, list[str]]) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(started)}"
        workdir.mkdir()
        server = PrometheusServer(workdir, targets)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def running_service_metrics_url(start_service: ServiceFactory) -> str:
    service = start_service()
    service.wait_ready()
    return f"{service.base_url}/metrics"


@pytest.fixture(scope="session")
def triton_metrics_url(triton: TritonServer) -> str:
    return triton.metrics_url
