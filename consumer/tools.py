"""Operator tools: replay the dead-letter topic; publish sample events and show the answers.

Both are plain synchronous Kafka clients; they share the service's settings and codec.
`sample_event` and `read_answer` are shared with the try-a-photo page (consumer/web.py).
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from consumer.errors import EventDecodeError
from consumer.events import (
    CategorySuggestion,
    DlqInfo,
    EventCodec,
    ListingImageUploaded,
    parse_dlq_headers,
)
from consumer.events.codec import codec_from_settings as make_codec
from consumer.events.dlq import DLQ_VALUE_OMITTED_HEADER, original_headers
from consumer.publish import producer_config
from consumer.settings import Settings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def replay_dlq(
    settings: Settings,
    *,
    reasons: Sequence[str] | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    group: str = "category-suggester-replay",
) -> int:
    """Re-publish DLQ records (key, value and original headers unchanged) into the input
    topic; returns the count replayed.

    Reads from the replayer group's committed position up to the end as it was at the
    start, so a second run replays only what arrived since. Records whose value was left
    out (too large to dead-letter, header `dlq.value.omitted`) are skipped and listed:
    there is nothing to replay. Reads committed records only; an exactly-once service
    writes the DLQ in transactions, whose markers take offsets that are never delivered,
    so progress is the consumer's position, not the offsets of the records read.
    """
    kafka = settings.kafka
    conf = kafka.common_config() | {
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
    }
    consumer = Consumer(conf)
    producer = Producer(producer_config(settings))
    replayed = 0
    try:
        metadata = consumer.list_topics(kafka.dlq_topic, timeout=10)
        partitions = [
            TopicPartition(kafka.dlq_topic, p) for p in metadata.topics[kafka.dlq_topic].partitions
        ]
        ends = {tp.partition: consumer.get_watermark_offsets(tp, 10)[1] for tp in partitions}
        committed = _committed(consumer, partitions)
        consumer.assign(
            [TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)) for tp in committed]
        )
        position = {tp.partition: max(tp.offset, 0) for tp in committed}
        while any(position[p] < ends[p] for p in position) and (limit is None or replayed < limit):
            message = consumer.poll(1.0)
            error = message.error() if message is not None else None
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise RuntimeError(f"reading the DLQ failed: {error}")
            elif message is not None:
                if _replay_one(message, producer, kafka.input_topic, reasons, dry_run):
                    replayed += 1
                position[message.partition() or 0] = (message.offset() or 0) + 1
            for tp in consumer.position(partitions):
                position[tp.partition] = max(position[tp.partition], tp.offset)
        if not dry_run:
            if producer.flush(30) != 0:
                raise RuntimeError("replayed records were not all acknowledged; nothing committed")
            consumer.commit(
                offsets=[TopicPartition(kafka.dlq_topic, p, o) for p, o in position.items()],
                asynchronous=False,
            )
    finally:
        consumer.close()
    return replayed


_COORDINATOR_SETTLING = (
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError._TIMED_OUT,
)


def _committed(consumer: Consumer, partitions: list[TopicPartition]) -> list[TopicPartition]:
    """The group's committed offsets; retried while the group coordinator settles (a
    broker just started answers NOT_COORDINATOR for a while)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            committed: list[TopicPartition] = consumer.committed(partitions, 10)
            return committed
        except KafkaException as exc:
            error = exc.args[0]
            settling = error.retriable() or error.code() in _COORDINATOR_SETTLING
            if not settling or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _replay_one(
    message: Message,
    producer: Producer,
    input_topic: str,
    reasons: Sequence[str] | None,
    dry_run: bool,
) -> bool:
    """Replay one DLQ record (print what is done); False when it is filtered or skipped."""
    info = parse_dlq_headers(message.headers() or [])
    if reasons and info.reason not in reasons:
        return False
    where = f"{message.topic()}[{message.partition()}]@{message.offset()}"
    omitted = dict(message.headers() or []).get(DLQ_VALUE_OMITTED_HEADER)
    if omitted is not None:
        size = omitted.decode(errors="replace") if isinstance(omitted, bytes) else omitted
        print(
            f"skip {where} reason={info.reason} stage={info.stage}: its value "
            f"({size} bytes) was too large to dead-letter"
        )
        return False
    verb = "would replay" if dry_run else "replay"
    print(f"{verb} {where} reason={info.reason} stage={info.stage}")
    if not dry_run:
        producer.produce(
            input_topic,
            key=message.key(),
            value=message.value(),
            headers=list(original_headers(message)),
        )
    return True


def _image_urls(source: str, host: str, port: int) -> tuple[list[str], Path | None]:
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no .jpg/.png/.webp images under {path}")
        urls = [f"http://{host}:{port}/{f.relative_to(path).as_posix()}" for f in files]
        return urls, path
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")], None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(folder: Path, host: str, port: int) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _cycle(urls: list[str], count: int) -> Iterator[str]:
    for i in range(count):
        yield urls[i % len(urls)]


def sample_event(url: str) -> ListingImageUploaded:
    """A listing-image-uploaded event for `url`: fresh ids, uploaded now."""
    return ListingImageUploaded(
        event_id=uuid.uuid4(),
        listing_id=f"listing-{uuid.uuid4().hex[:12]}",
        image_id=f"image-{uuid.uuid4().hex[:12]}",
        image_url=url,
        uploaded_at=datetime.now(UTC),
    )


@dataclass(frozen=True)
class Answer:
    """What the service answered to one event: a suggestion, or a dead-letter record."""

    # The answered event's id; None for a DLQ record whose value does not decode.
    event_id: str | None
    key: str
    suggestion: CategorySuggestion | None = None
    dead_letter: DlqInfo | None = None


def read_answer(message: Message, codec: EventCodec, output_topic: str) -> Answer:
    """The answer in a record of the output topic or of the DLQ.

    A suggestion names its event (`source_event_id`); a DLQ record keeps the event's
    value unchanged, so its id is read from there. Raises `EventDecodeError` for a
    suggestion or DLQ headers that do not decode.
    """
    key = (message.key() or b"").decode(errors="replace")
    if message.topic() == output_topic:
        suggestion = codec.decode_suggestion(message.value())
        return Answer(str(suggestion.source_event_id), key, suggestion=suggestion)
    info = parse_dlq_headers(message.headers() or [])
    try:
        event_id: str | None = str(codec.decode_uploaded(message.value()).event_id)
    except EventDecodeError:
        event_id = None
    return Answer(event_id, key, dead_letter=info)


def produce_sample(
    settings: Settings,
    *,
    source: str,
    host: str,
    port: int,
    count: int | None,
    wait_s: float,
) -> bool:
    """Publish one event per image; print each answer (suggestion or DLQ record).

    A folder is served over HTTP on host:port for as long as the answers are awaited;
    the service must list it in SUGGESTER_FETCH__ALLOWED_HOSTS. Returns True when every
    event was answered within `wait_s` (or when not waiting).
    """
    kafka = settings.kafka
    codec = make_codec(settings)
    urls, folder = _image_urls(source, host, port)
    server = _serve(folder, host, port) if folder is not None else None
    watcher = Consumer(
        kafka.common_config()
        | {
            "group.id": f"produce-sample-{uuid.uuid4()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        watcher.subscribe([kafka.output_topic, kafka.dlq_topic])
        _wait_for_assignment(watcher)
        producer = Producer(producer_config(settings))
        sent: dict[str, str] = {}
        for url in _cycle(urls, count or len(urls)):
            event = sample_event(url)
            producer.produce(
                kafka.input_topic, key=event.listing_id.encode(), value=codec.encode_uploaded(event)
            )
            sent[event.listing_id] = url
        if producer.flush(30) != 0:
            raise RuntimeError("sample events were not acknowledged by the broker")
        print(f"published {len(sent)} event(s) to {kafka.input_topic}")
        if wait_s <= 0:
            return True
        return _print_answers(watcher, codec, sent, kafka.output_topic, wait_s)
    finally:
        watcher.close()
        if server is not None:
            server.shutdown()


def _wait_for_assignment(consumer: Consumer, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise RuntimeError("no partitions assigned to the answer watcher")
        consumer.poll(0.2)


def _print_answers(
    watcher: Consumer, codec: EventCodec, sent: dict[str, str], output_topic: str, wait_s: float
) -> bool:
    pending = dict(sent)
    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        message = watcher.poll(0.5)
        if message is None or message.error():
            continue
        key = (message.key() or b"").decode(errors="replace")
        if key not in pending:
            continue
        url = pending.pop(key)
        answer = read_answer(message, codec, output_topic)
        if answer.suggestion is not None:
            s = answer.suggestion
            flag = "confident" if s.confident else "not confident"
            print(
                f"{key}: {s.category} {s.score:.3f} ({flag}) in {s.timings.total_ms:.0f} ms"
                f"  <- {url}"
            )
        elif answer.dead_letter is not None:
            info = answer.dead_letter
            print(f"{key}: DLQ stage={info.stage} reason={info.reason}: {info.message}  <- {url}")
    for key, url in pending.items():
        print(f"{key}: no answer within {wait_s:.0f} s  <- {url}")
    return not pending
