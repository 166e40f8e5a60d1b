"""The retry policy: capped exponential backoff with jitter, and a wait that a stop cuts short.

Every step that retries a fault of a dependency waits between its attempts as `Backoff`
says. The wait before retry `n` (from 0) is drawn from `[floor x c, c]`, where
`c = min(max_s, base_s x 2**n)` is the ceiling. Jitter spreads the retries of many tasks
and replicas after an outage that hit them all at once. The floor is 0 (full jitter) for
every step but Triton's, which uses 0.5: its start-up polling and batch retries never
come back at once.

Who uses which settings (floor in brackets):

- an event whose dependency is down (app.py): `triton.retry_backoff_*` (0);
- Kafka publish, transactions, producer replacement, rewind (delivery/):
  `kafka.retry_backoff_*` (0);
- image fetch attempts (fetch.py; a Retry-After answer overrides the wait):
  `fetch.backoff_*` (0);
- Triton start-up checks and inference (infer.py): `triton.retry_backoff_*` (0.5);
- a transactional librdkafka call repeated on its thread (publish.py): fixed (1, no jitter).

`jitter` (a float in [0, 1), default `random.random`) is injectable so that tests get
the waits they expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff", "Retries", "wait_or_stop"]

# Doublings past this leave the ceiling where it is: `2.0 ** n` raises OverflowError past
# 1023, and with any sane base the cap is reached long before.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter; see the module docstring."""

    base_s: float
    max_s: float
    # The shortest wait as a share of the ceiling: 0 is full jitter, 1 none.
    floor: float = 0.0
    jitter: Callable[[], float] = random.random

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s <= 0:
            raise ValueError(f"backoff needs base_s and max_s > 0, got {self.base_s}, {self.max_s}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"backoff floor must be in [0, 1], got {self.floor}")

    def ceiling_s(self, retry: int) -> float:
        """The longest wait before retry `retry` (from 0)."""
        return min(self.max_s, self.base_s * 2.0 ** min(retry, _MAX_DOUBLINGS))

    def delay_s(self, retry: int) -> float:
        """A wait before retry `retry` (from 0), drawn between the floor and the ceiling."""
        ceiling = self.ceiling_s(retry)
        return ceiling * (self.floor + (1.0 - self.floor) * self.jitter())

    def retries(self) -> Retries:
        """The waits of one retry loop, from its first."""
        return Retries(self)


class Retries:
    """One retry loop's waits: each call draws the next, longer ceiling (up to the cap)."""

    def __init__(self, backoff: Backoff) -> None:
        self._backoff = backoff
        self.count = 0  # waits drawn so far

    def next_delay_s(self) -> float:
        delay = self._backoff.delay_s(self.count)
        self.count += 1
        return delay

    async def wait(self, stop: asyncio.Event) -> bool:
        """Wait the next delay, or less if `stop` is set meanwhile; True when stopped."""
        return await wait_or_stop(stop, self.next_delay_s())


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait `seconds`, or less if `stop` is set meanwhile. Returns whether `stop` is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()
