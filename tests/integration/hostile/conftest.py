"""Fixtures of the hostile-input tests: a canary listener and a misbehaving origin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.hostile.servers import Canary, HostileOrigin


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    """A TCP listener on 127.0.0.1 and ::1 (one port) that records every connection."""
    listener = Canary()
    listener.start()
    yield listener
    listener.stop()


@pytest.fixture(scope="module")
def hostile_origin() -> Iterator[HostileOrigin]:
    origin = HostileOrigin()
    origin.start()
    yield origin
    origin.stop()
