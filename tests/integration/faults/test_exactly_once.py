"""Exactly-once delivery (SUGGESTER_DELIVERY=exactly_once) under consumer crashes."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from devstack.kafka import KafkaBroker
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    kafka_state,
    tiny_photos,
)
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

EXACTLY_ONCE = {"SUGGESTER_DELIVERY": "exactly_once"}


@dataclass(frozen=True)
class Plan:
    rounds: int
    events: int
    consumers: int = 3


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(Plan(rounds=2, events=1000), id="short"),
        pytest.param(
            Plan(rounds=20, events=10_000),
            id="long",
            marks=[pytest.mark.chaos, pytest.mark.timeout(7200)],
        ),
    ],
)
def test_kill_9_in_exactly_once_mode_duplicates_nothing_for_read_committed_readers(
    plan: Plan,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    urls = tiny_photos(image_origin, "eos")
    # Static membership, as a StatefulSet gives it: a restarted process has its
    # predecessor's group.instance.id and so its transactional.id, which fences the dead
    # one's producer and aborts its open transaction at once.
    group = ServiceGroup(
        start_service,
        plan.consumers,
        env=EXACTLY_ONCE,
        slot_env=lambda slot: {"SUGGESTER_KAFKA__GROUP_INSTANCE_ID": f"{topics.group}-{slot}"},
    ).start()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    rng = random.Random(11)
    kills = 0
    ready_s: list[float] = []
    drain_s: list[float] = []
    started = time.monotonic()
    for round_no in range(plan.rounds):
        before = plan.events * round_no
        flow = EventFlow(
            kafka.bootstrap_servers, topics.input, urls, plan.events, key_prefix=f"r{round_no}"
        ).start()
        watch.progress(before + plan.events // 3, timeout_s=120)
        victims = rng.sample(range(plan.consumers), rng.randint(1, plan.consumers - 1))
        killed_at = time.monotonic()
        group.kill(victims)
        kills += len(victims)
        group.restart(victims)
        ready_s.append(time.monotonic() - killed_at)
        flow.join()
        watch.answered(
            before + plan.events,
            timeout_s=120,
            diagnostics=lambda: kafka_state(kafka.bootstrap_servers, topics) + group.logs(),
        )
        drain_s.append(time.monotonic() - killed_at)
    elapsed = time.monotonic() - started
    assert group.terminate_all() == [0] * plan.consumers
    totals = watch.totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            "kill -9 consumers",
            f"exactly_once {plan.rounds}x{plan.events}",
            totals,
            {
                "kills": kills,
                "events_per_s": totals.events / elapsed,
                "ready_s_max": max(ready_s),
                "drain_s_max": max(drain_s),
                "drain_s_mean": sum(drain_s) / len(drain_s),
            },
        )
    )
    assert totals.events == plan.rounds * plan.events
    assert totals.lost == 0, totals.lost_sample
    assert totals.duplicated == 0, totals.duplicated_sample
    assert totals.keys_out_of_order == 0
    assert totals.dead_lettered_total == 0
    assert totals.foreign == 0
