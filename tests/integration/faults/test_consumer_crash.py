"""Consumer processes crash (kill -9) or are restarted (SIGTERM) while events flow."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import pytest

from category_suggester.settings import DeliveryMode
from devstack.kafka import KafkaBroker
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    BOTH_MODES,
    FAULT_ENV,
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    kafka_state,
    tiny_photos,
)
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Plan:
    rounds: int
    events: int
    consumers: int = 3


@pytest.mark.parametrize(
    "plan",
    [
        pytest.param(Plan(rounds=3, events=1000), id="short"),
        pytest.param(
            Plan(rounds=20, events=10_000),
            id="long",
            marks=[pytest.mark.chaos, pytest.mark.timeout(7200)],
        ),
    ],
)
@BOTH_MODES
def test_kill_9_of_consumers_loses_nothing_and_duplicates_at_most_the_window(
    plan: Plan,
    mode: str,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    """At-least-once: duplicates within the dead processes' windows. Exactly-once:
    none for read_committed readers, and each key's answers in input order."""
    exactly_once = mode == DeliveryMode.EXACTLY_ONCE.value
    urls = tiny_photos(image_origin, f"crash-{mode}")
    group = ServiceGroup(
        start_service,
        plan.consumers,
        env={"SUGGESTER_DELIVERY": mode},
        # Exactly-once runs with static membership, as a StatefulSet gives it: a restarted
        # process has its predecessor's group.instance.id and so its transactional.id,
        # which fences the dead one's producer and aborts its open transaction at once.
        slot_env=(
            (lambda slot: {"SUGGESTER_KAFKA__GROUP_INSTANCE_ID": f"{topics.group}-{slot}"})
            if exactly_once
            else (lambda _slot: {})
        ),
    ).start()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    rng = random.Random(9)
    kills = 0
    ready_s: list[float] = []
    drain_s: list[float] = []
    started = time.monotonic()
    for round_no in range(plan.rounds):
        before = plan.events * round_no
        flow = EventFlow(
            kafka.bootstrap_servers, topics.input, urls, plan.events, key_prefix=f"r{round_no}"
        ).start()
        # Mid-stream: a third of this round answered.
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
            timeout_s=300,
            diagnostics=lambda: kafka_state(kafka.bootstrap_servers, topics) + group.logs(),
        )
        drain_s.append(time.monotonic() - killed_at)
    elapsed = time.monotonic() - started
    assert group.terminate_all() == [0] * plan.consumers
    totals = watch.final_totals()
    watch.close()

    # At-least-once: a crash repeats what the dead process had answered but not yet
    # committed: at most its in-flight window (max_inflight plus one poll batch) and what
    # it finished within one commit interval (1 s) at the rate measured here.
    rate = totals.events / elapsed
    window = int(FAULT_ENV["SUGGESTER_CONSUMER__MAX_INFLIGHT"]) + int(
        FAULT_ENV["SUGGESTER_CONSUMER__POLL_BATCH"]
    )
    bound = 0 if exactly_once else kills * (window + int(rate * 1.0) + 1)
    fault_records.append(
        FaultRecord(
            "kill -9 consumers",
            f"{mode} {plan.rounds}x{plan.events}",
            totals,
            {
                "kills": kills,
                "dup_bound": bound,
                "events_per_s": rate,
                "ready_s_max": max(ready_s),
                "drain_s_max": max(drain_s),
                "drain_s_mean": sum(drain_s) / len(drain_s),
            },
        )
    )
    assert totals.events == plan.rounds * plan.events
    assert totals.lost == 0, totals.lost_sample
    assert totals.dead_lettered_total == 0
    assert totals.foreign == 0
    assert totals.extra_answers <= bound, (
        f"{totals.extra_answers} duplicates > bound {bound}: {totals.duplicated_sample}"
    )
    if exactly_once:
        assert totals.keys_out_of_order == 0


@pytest.mark.parametrize(
    ("events", "restarts"),
    [
        pytest.param(1500, 1, id="short"),
        pytest.param(20_000, 5, id="long", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)]),
    ],
)
@BOTH_MODES
def test_rolling_sigterm_restart_of_every_consumer_loses_and_duplicates_nothing(
    events: int,
    restarts: int,
    mode: str,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    urls = tiny_photos(image_origin, "rolling")
    group = ServiceGroup(start_service, 3, env={"SUGGESTER_DELIVERY": mode}).start()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    started = time.monotonic()
    # Paced so that the whole rolling restart happens with events flowing.
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, events, rate=60).start()
    step = events // (3 * restarts + 1)
    for restarted, slot in enumerate([s for _ in range(restarts) for s in range(3)], 1):
        watch.progress(step * restarted, timeout_s=120)
        assert group.terminate(slot) == 0, group.processes[slot].log_tail()
        group.restart([slot])
    flow.join()
    watch.answered(events, timeout_s=300, diagnostics=group.logs)
    elapsed = time.monotonic() - started
    assert group.terminate_all() == [0, 0, 0]
    totals = watch.final_totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            "SIGTERM rolling restart",
            f"{mode} {restarts}x3 restarts, {events} events",
            totals,
            {"events_per_s": totals.events / elapsed},
        )
    )
    assert totals.events == events
    assert totals.lost == 0, totals.lost_sample
    assert totals.duplicated == 0, totals.duplicated_sample
    assert totals.dead_lettered_total == 0
