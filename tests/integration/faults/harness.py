"""What the fault tests share: a flow of events, a group of service processes, the ledger.

- `EventFlow` produces events on a thread of its own (paced, keys from a small pool so
  that order per key means something), so faults happen with events flowing.
- `ServiceGroup` runs N `python -m category_suggester run` processes in one consumer group and
  kills, terminates and restarts them.
- `LedgerWatch` polls the ledger (category_suggester/ops/ledger.py) of the test's topics until a
  condition holds, and gives the final totals.
- `FaultRecord` is what a test reports; the folder's conftest prints every record at the
  end of the run (the totals `make chaos` shows).
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    ConsumerGroupTopicPartitions,
    IsolationLevel,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec
from PIL import Image

from category_suggester.events import EventCodec, ListingImageUploaded
from category_suggester.ops.ledger import Ledger, LedgerTotals
from category_suggester.settings import DeliveryMode
from tests.conftest import ServiceFactory, Topics
from tests.support.kafka import make_event
from tests.support.origin import ImageOrigin
from tests.support.service import ServiceProcess

CODEC = EventCodec()
# Runs a fault test once per delivery mode (its `mode` argument).
BOTH_MODES = pytest.mark.parametrize("mode", [m.value for m in DeliveryMode])
log = logging.getLogger(__name__)

# Settings every fault test's services run with. A dead member leaves the group after
# session.timeout.ms: the broker's minimum (6 s) keeps the tests short; production keeps
# the default (45 s) and recovers in that much more time. A small in-flight window keeps
# the duplicates of a crash small (they are bounded by it).
FAULT_ENV = {
    "SUGGESTER_KAFKA__SESSION_TIMEOUT_MS": "6000",
    "SUGGESTER_CONSUMER__MAX_INFLIGHT": "64",
    "SUGGESTER_CONSUMER__RESUME_INFLIGHT": "32",
    "SUGGESTER_CONSUMER__POLL_BATCH": "32",
    "SUGGESTER_TRITON__RETRY_BACKOFF_MAX_S": "1",
    "SUGGESTER_KAFKA__RETRY_BACKOFF_MAX_S": "1",
}


def tiny_photos(origin: ImageOrigin, prefix: str, count: int = 16, size: int = 64) -> list[str]:
    """URLs of `count` small JPEGs of distinct colours served by `origin`."""
    rng = random.Random(prefix)
    urls = []
    for i in range(count):
        colour = tuple(rng.randrange(256) for _ in range(3))
        out = io.BytesIO()
        Image.new("RGB", (size, size), colour).save(out, format="JPEG", quality=85)  # type: ignore[arg-type]
        urls.append(origin.add(f"{prefix}/{i}.jpg", out.getvalue()))
    return urls


class EventFlow:
    """Produce `count` events to `topic` on a thread, `rate` per second (None: at once)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        urls: Sequence[str],
        count: int,
        *,
        rate: float | None = 200.0,
        keys: int = 50,
        key_prefix: str = "listing",
    ) -> None:
        self.topic = topic
        self.count = count
        self.rate = rate
        self._urls = list(urls)
        self._keys = [f"{key_prefix}-{i}" for i in range(keys)]
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
        )
        self.events: list[ListingImageUploaded] = []
        self.started_at = 0.0
        self.finished_at = 0.0
        self._failures: list[str] = []
        self._thread = threading.Thread(target=self._run, name="event-flow", daemon=True)

    def start(self) -> EventFlow:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def join(self, timeout_s: float = 300) -> None:
        """Wait until every event is acknowledged by the broker (raises if one was not)."""
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the event flow did not finish in time"
        assert not self._failures, f"test events not acknowledged: {self._failures[:3]}"

    @property
    def produced(self) -> int:
        return len(self.events)

    def _run(self) -> None:
        def on_delivery(err: object, _msg: object) -> None:
            if err is not None:
                self._failures.append(str(err))

        for i in range(self.count):
            if self.rate is not None:
                # Pacing the producer, not synchronising with the service (poll returns
                # early when it serves a delivery report, hence the loop).
                while (lag := self.started_at + i / self.rate - time.monotonic()) > 0:
                    self._producer.poll(lag)
            key = self._keys[i % len(self._keys)]
            event = make_event(self._urls[i % len(self._urls)], listing_id=key)
            while True:
                try:
                    self._producer.produce(
                        self.topic,
                        key=key.encode(),
                        value=CODEC.encode_uploaded(event),
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    self._producer.poll(0.1)
            self.events.append(event)
            self._producer.poll(0)
        # A broker outage may be under way: the idempotent producer retries up to its
        # delivery timeout (2 minutes by default).
        remaining = self._producer.flush(150)
        if remaining:
            self._failures.append(f"{remaining} events still unacknowledged")
        self.finished_at = time.monotonic()


@dataclass
class ServiceGroup:
    """N service processes in one consumer group, started with the same settings."""

    start_service: ServiceFactory
    size: int
    env: dict[str, str] = field(default_factory=dict)
    processes: list[ServiceProcess] = field(default_factory=list)
    # Per-slot settings (e.g. a static group.instance.id), applied on every (re)start.
    slot_env: Callable[[int], dict[str, str]] = lambda _slot: {}

    def start(self) -> ServiceGroup:
        self.processes = [self._launch(slot) for slot in range(self.size)]
        for process in self.processes:
            process.wait_ready()
        return self

    def _launch(self, slot: int) -> ServiceProcess:
        return self.start_service(**(FAULT_ENV | self.env | self.slot_env(slot)))

    def kill(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self.processes[slot].kill()

    def restart(self, slots: Sequence[int], *, wait_ready: bool = True) -> None:
        for slot in slots:
            self.processes[slot] = self._launch(slot)
        if wait_ready:
            for slot in slots:
                self.processes[slot].wait_ready(timeout_s=120)

    def terminate(self, slot: int) -> int:
        return self.processes[slot].terminate()

    def terminate_all(self) -> list[int]:
        return [p.terminate() for p in self.processes if p.exit_code() is None]

    def logs(self) -> str:
        return "\n".join(p.log_tail(40) for p in self.processes)

    def rebalances(self) -> int:
        """Partitions revoked or lost so far, summed over the running processes' logs."""
        count = 0
        for process in self.processes:
            text = process.log_path.read_text(errors="replace")
            count += text.count('"partitions revoked"') + text.count('"partitions lost')
        return count

    def state(self) -> str:
        """Each process's in-flight, assigned and paused gauges and retries, for failures."""
        names = (
            "suggester_inflight_events",
            "suggester_assigned_partitions",
            "suggester_paused_partitions",
            'suggester_retries_total{stage="publish"}',
            'suggester_retries_total{stage="infer"}',
        )
        rows = []
        for slot, process in enumerate(self.processes):
            if process.exit_code() is not None:
                rows.append(f"[{slot}] exited {process.exit_code()}")
                continue
            page = process.metrics()
            rows.append(f"[{slot}] " + " ".join(f"{n}={metric_value(page, n)}" for n in names))
        return "\n".join(rows)

    def metric(self, name: str) -> float:
        """A metric's value (`name` with its labels, as exposed) summed over the processes."""
        return sum(metric_value(p.metrics(), name) for p in self.processes)


def metric_value(page: str, name: str) -> float:
    """The value of one sample in a Prometheus text page; 0 when it is absent."""
    for line in page.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class LedgerWatch:
    """The ledger of one test's topics, polled until a condition holds."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._ledger = Ledger(
            {"bootstrap.servers": bootstrap},
            input_topic=topics.input,
            output_topic=topics.output,
            dlq_topic=topics.dlq,
            codec=CODEC,
        )

    def close(self) -> None:
        self._ledger.close()

    def totals(self, timeout_s: float = 60) -> LedgerTotals:
        """Read everything committed so far; fail if the end cannot be reached in time."""
        assert self._ledger.refresh(timeout_s), f"the ledger is behind: {self._ledger.behind}"
        return self._ledger.totals()

    def final_totals(self, timeout_s: float = 60) -> LedgerTotals:
        """The totals once nothing moves any more (flows done, services stopped), checked
        against a second count made independently (by event id, `count_by_event_id`): the
        two must agree on what was lost and duplicated."""
        totals = self.totals(timeout_s)
        lost, extra = count_by_event_id(self._bootstrap, self._topics, timeout_s)
        assert (lost, extra) == (totals.lost, totals.extra_answers), (
            f"independent count: lost={lost} extra answers={extra}; ledger: {totals.line()}"
        )
        return totals

    def wait(
        self,
        condition: Callable[[LedgerTotals], bool],
        *,
        timeout_s: float,
        what: str,
        diagnostics: Callable[[], str] = lambda: "",
    ) -> LedgerTotals:
        """Poll until `condition(totals)` holds; fail with the last totals after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        totals = self._ledger.totals()
        while time.monotonic() < deadline:
            self._ledger.refresh(min(5.0, max(0.5, deadline - time.monotonic())))
            totals = self._ledger.totals()
            log.info("%s: %s", what, totals.line())
            if condition(totals):
                return totals
        raise AssertionError(
            f"not {what} within {timeout_s:.0f} s: {totals.line()}\n{diagnostics()}"
        )

    def answered(
        self, events: int, *, timeout_s: float, diagnostics: Callable[[], str] = lambda: ""
    ) -> LedgerTotals:
        """Wait until `events` input events exist and each has at least one answer."""
        return self.wait(
            lambda t: t.events >= events and t.lost == 0,
            timeout_s=timeout_s,
            what=f"{events} events answered",
            diagnostics=diagnostics,
        )

    def progress(self, answered: int, *, timeout_s: float) -> LedgerTotals:
        """Wait until at least `answered` events have an answer (mid-stream markers)."""
        return self.wait(
            lambda t: t.events - t.lost >= answered,
            timeout_s=timeout_s,
            what=f"{answered} events answered",
        )


def count_by_event_id(bootstrap: str, topics: Topics, timeout_s: float) -> tuple[int, int]:
    """(lost, extra answers) counted apart from category_suggester/ops/ledger.py, for a cross-check.

    The ledger matches answers to input positions (partition, offset) and reads DLQ
    headers; this matches them by event id alone: the ids in the input values, the
    suggestions' source_event_id and the ids in the DLQ records' values (the fault tests
    produce only decodable events). An id at n input positions with m answers has
    max(0, n - m) lost and max(0, m - n) extra. Reads the three topics to their
    read_committed ends.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = (topics.input, topics.output, topics.dlq)
    described = admin.describe_topics(TopicCollection(list(names)))
    partitions = [
        TopicPartition(name, p.id)
        for name, future in described.items()
        for p in future.result(timeout_s).partitions
    ]
    ends = admin.list_offsets(
        {tp: OffsetSpec.latest() for tp in partitions},
        isolation_level=IsolationLevel.READ_COMMITTED,
        request_timeout=timeout_s,
    )
    remaining = {(tp.topic, tp.partition): f.result().offset for tp, f in ends.items()}
    remaining = {tp: end for tp, end in remaining.items() if end > 0}
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"independent-{topics.group}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    inputs: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    reader.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in remaining])
    deadline = time.monotonic() + timeout_s
    try:
        while remaining:
            assert time.monotonic() < deadline, f"independent count: not at the end {remaining}"
            for message in reader.consume(num_messages=1000, timeout=0.2):
                if message.error() is not None:
                    continue
                topic, value = message.topic(), message.value() or b""
                if topic == topics.output:
                    answers[str(CODEC.decode_suggestion(value).source_event_id)] += 1
                else:
                    event_id = str(CODEC.decode_uploaded(value).event_id)
                    (inputs if topic == topics.input else answers)[event_id] += 1
            # Aborted records and transaction markers are never delivered: go by position.
            for tp in reader.position([TopicPartition(t, p) for t, p in remaining]):
                if tp.offset >= remaining[(tp.topic, tp.partition)]:
                    del remaining[(tp.topic, tp.partition)]
    finally:
        reader.close()
    lost = sum(max(0, n - answers[event_id]) for event_id, n in inputs.items())
    extra = sum(max(0, m - inputs[event_id]) for event_id, m in answers.items())
    return lost, extra


@dataclass
class FaultRecord:
    """One fault's outcome, as the end-of-run summary prints it."""

    fault: str
    mode: str
    totals: LedgerTotals
    numbers: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        extra = " ".join(f"{k}={v:.3g}" for k, v in self.numbers.items())
        return f"{self.fault} [{self.mode}]: {self.totals.line()} {extra}".rstrip()


def kafka_state(bootstrap: str, topics: Topics) -> str:
    """The group's committed offsets against the input's ends, and each output partition's
    last stable offset against its high watermark (an open transaction holds the first
    back): what a failure message needs to tell a stuck group from a stuck transaction."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    lines = []
    try:
        request = ConsumerGroupTopicPartitions(topics.group)
        committed = admin.list_consumer_group_offsets([request], require_stable=False)
        offsets = {
            tp.partition: tp.offset
            for tp in committed[topics.group].result().topic_partitions
            if tp.topic == topics.input
        }
        for topic in (topics.input, topics.output, topics.dlq):
            partitions = topics.partitions if topic != topics.dlq else 1
            specs = {TopicPartition(topic, p): OffsetSpec.latest() for p in range(partitions)}
            stable = admin.list_offsets(specs, isolation_level=IsolationLevel.READ_COMMITTED)
            high = admin.list_offsets(specs, isolation_level=IsolationLevel.READ_UNCOMMITTED)
            for tp in specs:
                row = f"{topic.rsplit('_', 1)[-1]}[{tp.partition}] "
                row += f"lso={stable[tp].result().offset} hw={high[tp].result().offset}"
                if topic == topics.input:
                    row += f" committed={offsets.get(tp.partition)}"
                lines.append(row)
    except KafkaException as exc:
        lines.append(f"(could not read the group's state: {exc})")
    return "\n".join(lines)
