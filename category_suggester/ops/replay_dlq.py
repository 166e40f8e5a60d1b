"""`python -m category_suggester replay-dlq`: re-publish dead-letter records into the input topic.

Takes the dead-letter topic from the replayer group's committed position to its end as
it was at the start; puts each record back on the input topic with its key, value and
original headers (the `dlq.*` ones dropped); commits the group's position once every
replayed record is acknowledged. `--reason` filters, `--dry-run` only lists. Raises
`RuntimeError` when the DLQ cannot be read or the replayed records are not acknowledged.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from category_suggester.events import DLQ_VALUE_OMITTED_HEADER, original_headers, parse_dlq_headers
from category_suggester.publish import producer_config
from category_suggester.settings import Settings

HELP: Final = "re-publish dead-letter records into the input topic"
DEFAULT_GROUP: Final = "category-suggester-replay"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", action="append", help="only records with this reason")
    parser.add_argument("--max", type=int, default=None, help="stop after this many records")
    parser.add_argument("--dry-run", action="store_true", help="list, do not publish")
    parser.add_argument("--group", default=DEFAULT_GROUP, help="consumer group of the replayer")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Replay for parsed `add_arguments` options; prints the count, returns 0."""
    replayed = replay_dlq(
        settings, reasons=args.reason, limit=args.max, dry_run=args.dry_run, group=args.group
    )
    print(f"{'would replay' if args.dry_run else 'replayed'} {replayed} record(s)")
    return 0


def replay_dlq(
    settings: Settings,
    *,
    reasons: Sequence[str] | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    group: str = DEFAULT_GROUP,
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
