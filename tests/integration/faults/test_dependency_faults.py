"""Dependencies fail while events flow: Triton stops or slows down, origins misbehave."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from category_suggester.events import parse_dlq_headers
from devstack.kafka import KafkaBroker
from devstack.triton import TritonServer
from tests.conftest import ServiceFactory, Topics
from tests.integration.faults.harness import (
    CODEC,
    EventFlow,
    FaultRecord,
    LedgerWatch,
    ServiceGroup,
    tiny_photos,
)
from tests.integration.faults.hostile_origin import HostileOrigin
from tests.support.kafka import read_answers
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

# A consumer that stopped polling would be evicted 10 s later (the smallest value the
# settings allow), well inside every fault below: staying in the group is then a proof.
POLLING = {"SUGGESTER_KAFKA__MAX_POLL_INTERVAL_MS": "10000"}
INFER_RETRIES = 'suggester_retries_total{stage="infer"}'


@pytest.mark.parametrize(
    "outage_s",
    [
        pytest.param(30, id="short"),
        pytest.param(120, id="long", marks=[pytest.mark.chaos, pytest.mark.timeout(900)]),
    ],
)
def test_triton_stopped_then_restarted_loses_and_dead_letters_nothing(
    outage_s: int,
    kafka: KafkaBroker,
    topics: Topics,
    triton: TritonServer,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    urls = tiny_photos(image_origin, "outage")
    group = ServiceGroup(start_service, 2, env=POLLING).start()
    rebalances = group.rebalances()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    rate = 40.0
    events = int(rate * (outage_s + 15))
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, events, rate=rate).start()
    watch.progress(int(rate * 5), timeout_s=60)
    answered_before = watch.totals().events - watch.totals().lost
    triton.stop()
    stopped_at = time.monotonic()
    try:
        retries = group.metric(INFER_RETRIES)
        # Through the outage: every consumer keeps its partitions, and keeps retrying.
        while time.monotonic() - stopped_at < outage_s:
            assert all(p.exit_code() is None for p in group.processes), group.logs()
            assert group.rebalances() == rebalances, f"a consumer left the group:\n{group.logs()}"
            watch.totals()
        assert group.metric(INFER_RETRIES) > retries
        answered_during = watch.totals().events - watch.totals().lost - answered_before
    finally:
        triton.start()
    restarted_at = time.monotonic()
    flow.join()
    watch.answered(events, timeout_s=240, diagnostics=group.logs)
    drain_s = time.monotonic() - restarted_at
    assert group.rebalances() == rebalances, group.logs()
    assert group.terminate_all() == [0, 0]
    totals = watch.final_totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            f"Triton stopped {outage_s} s",
            f"at_least_once {events} events",
            totals,
            {"answered_during_outage": answered_during, "drain_after_restart_s": drain_s},
        )
    )
    assert totals.lost == 0, totals.lost_sample
    assert totals.dead_lettered_total == 0, totals.dead_lettered
    # What was in flight when Triton stopped may finish; nothing new is answered.
    assert answered_during <= 64 * 2 + 32 * 2


def test_slow_triton_keeps_the_stream_moving_and_requests_within_their_deadline(
    kafka: KafkaBroker,
    topics: Topics,
    slow_triton: Path,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    delay_file = slow_triton
    urls = tiny_photos(image_origin, "slow")
    env = POLLING | {"SUGGESTER_TRITON__REQUEST_TIMEOUT_S": "1"}
    group = ServiceGroup(start_service, 2, env=env).start()
    rebalances = group.rebalances()
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    events = 900
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, events, rate=30).start()

    # Slow (0.3 s a batch, under the 1 s deadline): answers keep coming, batched bigger.
    delay_file.write_text("0.3")
    slow_from = watch.totals().events - watch.totals().lost
    started = time.monotonic()
    watch.progress(slow_from + 200, timeout_s=60)
    slow_rate = 200 / (time.monotonic() - started)

    # Slower than the deadline (3 s a batch): every request is cut at 1 s and retried,
    # nothing is dead-lettered, nobody leaves the group.
    retries = group.metric(INFER_RETRIES)
    delay_file.write_text("3")
    stalled_at = time.monotonic()
    while time.monotonic() - stalled_at < 15:
        assert group.rebalances() == rebalances, group.logs()
        watch.totals()
    cut = group.metric(INFER_RETRIES) - retries
    assert cut > 0, "no inference request was cut at its deadline"

    delay_file.write_text("0")
    flow.join()
    watch.answered(events, timeout_s=240, diagnostics=group.logs)
    assert group.rebalances() == rebalances, group.logs()
    assert group.terminate_all() == [0, 0]
    totals = watch.final_totals()
    watch.close()
    fault_records.append(
        FaultRecord(
            "Triton slowed (0.3 s, then 3 s per batch)",
            f"at_least_once {events} events",
            totals,
            {"events_per_s_at_0.3s": slow_rate, "requests_cut_at_deadline": cut},
        )
    )
    assert totals.lost == 0, totals.lost_sample
    assert totals.dead_lettered_total == 0, totals.dead_lettered


@pytest.fixture
def hostile_origin() -> Iterator[HostileOrigin]:
    origin = HostileOrigin()
    origin.start()
    yield origin
    origin.stop()


def test_slow_loris_endless_and_hanging_origins_hit_the_fetch_deadline_not_the_stream(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    hostile_origin: HostileOrigin,
    start_service: ServiceFactory,
    fault_records: list[FaultRecord],
) -> None:
    total_timeout_s = 3.0
    service = start_service(
        SUGGESTER_FETCH__ALLOWED_HOSTS=f"{image_origin.host_port},{hostile_origin.host_port}",
        SUGGESTER_FETCH__TOTAL_TIMEOUT_S=str(total_timeout_s),
        SUGGESTER_FETCH__READ_TIMEOUT_S="1",
        SUGGESTER_FETCH__MAX_BYTES=str(2 * 1024 * 1024),
    )
    service.wait_ready()
    # One event in ten goes to a hostile origin, in turn slow-loris, endless and hanging.
    urls = tiny_photos(image_origin, "beside-hostile", count=30)
    for i, kind in ((5, "slowloris"), (15, "endless"), (25, "hang")):
        urls[i] = hostile_origin.url(kind, "photo")
    flow = EventFlow(kafka.bootstrap_servers, topics.input, urls, 300, rate=30).start()
    flow.join()
    events = flow.events
    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=len(events)
    )
    assert service.terminate() == 0
    watch = LedgerWatch(kafka.bootstrap_servers, topics)
    totals = watch.final_totals()
    watch.close()

    hostile = {str(e.event_id): e for e in events if hostile_origin.host_port in e.image_url}
    assert set(answers.dead_letters) == set(hostile)
    late = []
    for event_id, records in answers.dead_letters.items():
        info = parse_dlq_headers(records[0].headers() or [])
        assert info.reason in ("fetch_timeout", "too_large"), info
        # The deadline covers every attempt; a little more for queueing on two cores.
        took = (info.failed_at - hostile[event_id].uploaded_at).total_seconds()
        if took > total_timeout_s + 5:
            late.append(took)
    assert not late, f"hostile fetches past the deadline: {late}"
    good_ms = sorted(s[0].timings.total_ms for s in answers.suggestions.values())
    median_ms = good_ms[len(good_ms) // 2]
    fault_records.append(
        FaultRecord(
            "hostile origins (slow-loris, endless body, hang)",
            f"at_least_once {len(events)} events, 10% hostile",
            totals,
            {
                "good_median_ms": median_ms,
                "good_p99_ms": good_ms[int(len(good_ms) * 0.99)],
                "requests_to_hostile": sum(hostile_origin.hits.values()),
            },
        )
    )
    assert totals.lost == 0
    assert totals.duplicated == 0
    # The good events were not held up behind the hostile ones: most took far less than
    # one fetch deadline, end to end.
    assert median_ms < total_timeout_s * 1000, median_ms
