"""Fixtures shared by the consumer's unit tests."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from category_suggester.metrics import Metrics


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of the test's own, so metric values start at zero."""
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)
