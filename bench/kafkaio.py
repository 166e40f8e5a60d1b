"""Kafka for the benchmark: topics, the load generator and the reader of the answers.

Every timestamp the harness uses comes from the broker: topics are created with
`message.timestamp.type=LogAppendTime`, so each record carries the broker's clock at the
moment it was appended. The input event's time is the one the broker returns in the
producer's delivery report, the suggestion's is the one on the output record; their
difference is the end-to-end latency, independent of anything the service reports.

Events are keyed by a listing id unique to the event, and the service keys its suggestion
(and a dead-letter record) with the same listing id, so the reader matches answers to
events by key without decoding values.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from category_suggester.events import EventCodec, ListingImageUploaded

TOPIC_CONFIG = {"message.timestamp.type": "LogAppendTime"}
# librdkafka's syslog levels: 3 keeps errors and drops the transient notices (a coordinator
# still loading on a fresh broker) that would interleave with the progress lines.
_LOG_LEVEL = 3


class BenchKafkaError(RuntimeError):
    """The benchmark could not set up or use its topics."""


@dataclass(frozen=True)
class RunTopics:
    input: str
    output: str
    dlq: str
    group: str
    partitions: int


def create_run_topics(bootstrap: str, run: str, partitions: int = 6) -> RunTopics:
    """Fresh input, output and DLQ topics and a group name for one run."""
    base = f"bench.{run}.{uuid.uuid4().hex[:8]}"
    topics = RunTopics(f"{base}.in", f"{base}.out", f"{base}.dlq", f"{base}.group", partitions)
    create_topics(bootstrap, {topics.input: partitions, topics.output: partitions, topics.dlq: 1})
    return topics


def create_topics(bootstrap: str, topics: Mapping[str, int], timeout_s: float = 30) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": _LOG_LEVEL})
    new = [
        NewTopic(name, num_partitions=n, config=dict(TOPIC_CONFIG)) for name, n in topics.items()
    ]
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise BenchKafkaError(f"creating topic {name!r} failed: {exc}") from exc
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(timeout=5)
        ready = all(
            name in metadata.topics
            and metadata.topics[name].error is None
            and len(metadata.topics[name].partitions) == n
            and all(p.leader >= 0 for p in metadata.topics[name].partitions.values())
            for name, n in topics.items()
        )
        if ready:
            return
        if time.monotonic() >= deadline:
            raise BenchKafkaError(f"topics {sorted(topics)} not ready after {timeout_s:.0f} s")
        time.sleep(0.1)  # polling the broker's metadata: it has no readiness notification


def delete_topics(bootstrap: str, topics: RunTopics) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": _LOG_LEVEL})
    for future in admin.delete_topics([topics.input, topics.output, topics.dlq]).values():
        try:
            future.result()
        except KafkaException:
            continue  # a leftover topic only costs disk in a throwaway broker


class EventSource:
    """Makes benchmark events for a list of image URLs, cycling through them."""

    def __init__(self, urls: Sequence[str], run: str, codec: EventCodec | None = None) -> None:
        if not urls:
            raise ValueError("no image URLs")
        self._urls = list(urls)
        self._run = run
        self._codec = codec or EventCodec()
        self._next = 0

    def record(self) -> tuple[bytes, bytes]:
        """(key, value) of the next event; uploaded_at is now."""
        index = self._next
        self._next += 1
        listing = f"{self._run}-{index:08d}"
        event = ListingImageUploaded(
            event_id=uuid.uuid4(),
            listing_id=listing,
            image_id=f"img-{index:08d}",
            image_url=self._urls[index % len(self._urls)],
            uploaded_at=datetime.now(UTC),
            seller_id="bench",
            country="XX",
        )
        return listing.encode(), self._codec.encode_uploaded(event)

    def url_for(self, key: bytes) -> str:
        """The image URL of the event `record` made with this key."""
        index = int(key.rsplit(b"-", 1)[1])
        return self._urls[index % len(self._urls)]


@dataclass
class Produced:
    """Broker append times (ms) of the produced events, by key; and any delivery failures."""

    append_ms: dict[bytes, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    log_append_time: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            with self._lock:
                self.failures.append(err.str())
            return
        kind, stamp = msg.timestamp()
        with self._lock:
            if kind != TIMESTAMP_LOG_APPEND_TIME:
                self.log_append_time = False
            self.append_ms[msg.key() or b""] = stamp


def _producer(bootstrap: str, linger_ms: int) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "log_level": _LOG_LEVEL,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": linger_ms,
            "queue.buffering.max.messages": 1_000_000,
        }
    )


def produce_backlog(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes]]) -> Produced:
    """Produce every record as fast as the client allows; return once all are acknowledged."""
    produced = Produced()
    producer = _producer(bootstrap, linger_ms=20)
    for count, (key, value) in enumerate(records, 1):
        producer.produce(topic, key=key, value=value, on_delivery=produced.on_delivery)
        if count % 2000 == 0:
            producer.poll(0)
    if producer.flush(60) != 0:
        raise BenchKafkaError(f"backlog for {topic} not acknowledged within 60 s")
    return produced


class PacedProducer:
    """Produces events at a fixed rate on a thread, for a duration or until stopped."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        source: EventSource,
        *,
        rate: float,
        duration_s: float,
    ) -> None:
        self.produced = Produced()
        self.sent = 0
        self._producer = _producer(bootstrap, linger_ms=0)
        self._topic = topic
        self._source = source
        self._rate = rate
        self._duration_s = duration_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="paced-producer", daemon=True)

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        total = int(self._rate * self._duration_s)
        for index in range(total):
            due = started + index / self._rate
            # The schedule is absolute, so a late wake-up is caught up, never drifts.
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            if self._stop.is_set():
                break
            key, value = self._source.record()
            self._producer.produce(
                self._topic, key=key, value=value, on_delivery=self.produced.on_delivery
            )
            self._producer.poll(0)
            self.sent += 1
        self._producer.flush(30)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> None:
        self._thread.join(timeout_s)


@dataclass
class Answer:
    """One answer: its broker append time and when the reader received it (both ms)."""

    key: bytes
    topic: str
    append_ms: int
    received_ms: int


class AnswerReader:
    """Reads the output and DLQ topics from the beginning on a thread; counts by key.

    Reads committed records only, as downstream services must: with exactly-once delivery
    an answer counts from the commit of its transaction (records of aborted transactions
    are never seen). `Answer.received_ms` is when this reader got it: the time it became
    visible, within the reader's fetch wait (10 ms).
    """

    def __init__(self, bootstrap: str, topics: RunTopics) -> None:
        self._topics = topics
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "log_level": _LOG_LEVEL,
                "group.id": f"{topics.group}.reader",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": 10,
                "isolation.level": "read_committed",
            }
        )
        self.first: dict[bytes, Answer] = {}
        self.duplicates = 0
        self.dead_letters = 0
        # Values of the first suggestion of each key: the service's own stage timings.
        self.suggestions: dict[bytes, bytes] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="answer-reader", daemon=True)

    def start(self) -> AnswerReader:
        assignment = [
            TopicPartition(self._topics.output, p, OFFSET_BEGINNING)
            for p in range(self._topics.partitions)
        ] + [TopicPartition(self._topics.dlq, 0, OFFSET_BEGINNING)]
        self._consumer.assign(assignment)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                # One message first, then what else is there: a batch consume waits for
                # its whole batch or its timeout, which would delay what it returns.
                messages = self._consumer.consume(num_messages=1, timeout=0.05)
                if messages:
                    messages += self._consumer.consume(num_messages=999, timeout=0)
                good = [m for m in messages if m.error() is None]
                if not good:
                    continue
                received_ms = int(time.time() * 1000)
                with self._changed:
                    for message in good:
                        key = message.key() or b""
                        topic = message.topic() or ""
                        if topic == self._topics.dlq:
                            self.dead_letters += 1
                        elif key not in self.suggestions:
                            self.suggestions[key] = message.value() or b""
                        if key in self.first:
                            self.duplicates += 1
                        else:
                            self.first[key] = Answer(
                                key, topic, message.timestamp()[1], received_ms
                            )
                    self._changed.notify_all()
        finally:
            self._consumer.close()

    @property
    def answered(self) -> int:
        with self._lock:
            return len(self.first)

    def wait_for(
        self,
        count: int,
        timeout_s: float,
        *,
        progress: Callable[[int], None] | None = None,
        progress_every_s: float = 5.0,
    ) -> int:
        """Wait until `count` distinct events are answered or the timeout; return the count."""
        deadline = time.monotonic() + timeout_s
        next_report = time.monotonic() + progress_every_s
        while True:
            with self._changed:
                now = time.monotonic()
                if len(self.first) >= count or now >= deadline:
                    return len(self.first)
                self._changed.wait(min(deadline, next_report) - now)
                seen = len(self.first)
            if progress is not None and time.monotonic() >= next_report:
                next_report += progress_every_s
                progress(seen)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
