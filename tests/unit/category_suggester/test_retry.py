"""The retry policy with its jitter injected: ceilings, jitter floors, and the stoppable wait."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from category_suggester.retry import Backoff, wait_or_stop


def constant(value: float) -> Backoff:
    return Backoff(0.1, 1.0, jitter=lambda: value)


def test_the_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(0.1, 1.0)
    assert [backoff.ceiling_s(n) for n in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_the_ceiling_stays_at_the_cap_however_many_retries() -> None:
    assert Backoff(0.1, 5.0).ceiling_s(10_000) == 5.0


def test_full_jitter_scales_the_ceiling_by_the_draw() -> None:
    assert [constant(0.5).delay_s(n) for n in range(5)] == [0.05, 0.1, 0.2, 0.4, 0.5]
    assert constant(0.0).delay_s(3) == 0.0


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 0.4), (0.5, 0.6), (0.999, 0.7996)])
def test_half_jitter_keeps_at_least_half_the_ceiling(draw: float, expected: float) -> None:
    backoff = Backoff(0.1, 1.0, floor=0.5, jitter=lambda: draw)
    assert backoff.delay_s(3) == pytest.approx(expected)


def test_no_jitter_waits_the_ceiling() -> None:
    backoff = Backoff(0.05, 1.0, floor=1.0, jitter=lambda: 0.3)
    assert [backoff.delay_s(n) for n in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]


def test_a_retry_loop_draws_longer_waits_in_turn() -> None:
    draws = itertools.cycle([1.0, 0.5])
    retries = Backoff(0.2, 5.0, jitter=lambda: next(draws)).retries()
    assert [retries.next_delay_s() for _ in range(7)] == [0.2, 0.2, 0.8, 0.8, 3.2, 2.5, 5.0]
    assert retries.count == 7


def test_the_default_jitter_stays_under_the_ceiling() -> None:
    backoff = Backoff(0.2, 5.0)
    delays = [backoff.delay_s(2) for _ in range(200)]
    assert all(0.0 <= d < 0.8 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize(
    ("base", "cap", "floor"), [(0.0, 1.0, 0.0), (0.1, -1.0, 0.0), (0.1, 1.0, 1.5)]
)
def test_nonsense_is_refused(base: float, cap: float, floor: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(base, cap, floor=floor)


async def test_wait_or_stop_waits_its_time_when_nobody_stops_it() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await wait_or_stop(asyncio.Event(), 0.05) is False
    assert loop.time() - started >= 0.05


async def test_a_stop_cuts_a_wait_short() -> None:
    stop = asyncio.Event()
    retries = Backoff(3600.0, 3600.0, floor=1.0).retries()
    waiting = asyncio.create_task(retries.wait(stop))
    await asyncio.sleep(0)
    assert not waiting.done()
    stop.set()
    assert await asyncio.wait_for(waiting, 5) is True


async def test_a_wait_after_the_stop_returns_at_once() -> None:
    stop = asyncio.Event()
    stop.set()
    assert await asyncio.wait_for(wait_or_stop(stop, 3600.0), 5) is True
