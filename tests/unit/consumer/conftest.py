"""Fixtures shared by the consumer's unit tests: a metrics registry of the test's own."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from consumer.metrics import Metrics


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)
