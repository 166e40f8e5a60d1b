"""The Kafka broker is killed (kill -9) mid-stream and restarted on its log directory."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devstack.kafka import KafkaBroker
from devstack.process import StackError, free_port
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    BOTH_MODES,
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    kafka_state,
    tiny_photos,
)
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A cluster of this module's own: the tests kill its broker, which the suite's must not see.

    The controller runs apart from the broker, as in production, and stays up while the
    broker is down; the broker comes back once the controller has fenced it. A combined
    node, or a broker back before its session expired, fences its own previous
    registration while its transaction coordinator already sends the markers of the
    transactions it reloaded, and Kafka 4.4.0 skips the markers of partitions that have no
    leader at that moment (GUARANTEES.md, "Broker crashes").
    """
    broker = KafkaBroker(
        tmp_path_factory.mktemp("crash-kafka"),
        port=free_port(),
        controller_port=free_port(),
        dedicated_controller=True,
    )
    try:
        broker.start()
    except StackError as exc:
        pytest.fail(f"the broker for the crash tests could not start: {exc}", pytrace=False)
    yield broker
    broker.stop()


@pytest.mark.parametrize(
    ("events", "crashes"),
    [
        pytest.param(1200, 1, id="short"),
        pytest.param(10_000, 5, id="long", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)]),
    ],
)
@BOTH_MODES
def test_broker_kill_9_and_restart_loses_nothing(
    events: int,
    crashes: int,
    mode: str,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    urls = tiny_photos(image_origin, "broker")
    group = ServiceGroup(start_service, 2, env={"SUGGESTER_DELIVERY": mode}).start()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    started = time.monotonic()
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, events, rate=100).start()
    down_s: list[float] = []
    for crash in range(crashes):
        watch.progress(events * (crash + 1) // (crashes + 2), timeout_s=180)
        killed_at = time.monotonic()
        kafka.kill()
        kafka.wait_fenced()
        kafka.start()
        down_s.append(time.monotonic() - killed_at)
    flow.join()
    watch.answered(
        events,
        timeout_s=180,
        diagnostics=lambda: "\n".join(
            (kafka_state(kafka.bootstrap_servers, topics), group.state(), group.logs())
        ),
    )
    recovered_s = time.monotonic() - killed_at
    assert group.terminate_all() == [0, 0], group.logs()
    totals = watch.final_totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            "Kafka kill -9 + restart",
            f"{mode} {crashes} crash(es), {events} events",
            totals,
            {
                "events_per_s": totals.events / (time.monotonic() - started),
                "broker_down_s_max": max(down_s),
                "last_crash_to_drained_s": recovered_s,
            },
        )
    )
    assert totals.events == events
    assert totals.lost == 0, totals.lost_sample
    assert totals.dead_lettered_total == 0
    if mode == "exactly_once":
        assert totals.duplicated == 0, totals.duplicated_sample


def test_the_controller_outlives_a_broker_crash_and_fences_the_broker(
    kafka: KafkaBroker,
) -> None:
    """The shape the test above relies on: only the broker dies, the controller fences it,
    and the broker, started only then, registers at its first try."""
    controller = kafka.controller_pid()
    broker_log = kafka.state_dir / "logs" / "server.log"
    kafka.kill()
    assert not kafka.is_running()
    assert kafka.controller_pid() == controller
    kafka.wait_fenced()
    restarted_from = broker_log.stat().st_size
    kafka.start()
    assert kafka.controller_pid() == controller
    with broker_log.open("rb") as handle:
        handle.seek(restarted_from)
        assert b"DUPLICATE_BROKER_REGISTRATION" not in handle.read()
