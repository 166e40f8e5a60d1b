"""The delivery ledger: was every input event answered, once, and in order per key?

Takes: the input topic, the output topic and the dead-letter topic, read from the start
as a `read_committed` consumer sees them (aborted transactions are invisible, an open one
hides what follows it). Gives, per input event (a topic-partition-offset of the input):

- answered once: exactly one suggestion or one DLQ record names it;
- duplicated: more than one does (the count of extra answers is kept);
- lost: none does.

A suggestion names its input by `source_event_id`; a DLQ record by its `dlq.original_*`
headers (so an undecodable input is matched too). When the input holds one event id at
several offsets (a replayed DLQ record, a producer retry without idempotence), its
suggestions are shared among those offsets in order. Answers that name no input event
are counted as `foreign` (another run's records, or a bug).

Order per key: for each input key, the offsets of its events, taken in the order their
first suggestions appear in the output topic, must rise; a key where they do not counts
as out of order. DLQ records live in another topic and take no part in it.

`Ledger` reads incrementally (`refresh()` reads what arrived since the last call up to
the current read_committed end of every partition), so a test can poll it while events
flow; `totals()` summarises. Raises `LedgerError` when the topics cannot be read.

Command line: `python -m category_suggester ledger --input T --output T --dlq T [--bootstrap B]
[--json]` prints the totals and exits 1 when an event was lost or duplicated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Final

from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from category_suggester.errors import EventDecodeError, RegistryError
from category_suggester.events import EventCodec, codec_from_settings, parse_dlq_headers
from category_suggester.settings import Settings

HELP: Final = "check that every input event was answered once (read_committed)"

Position = tuple[int, int]  # (partition, offset) in the input topic

_POLL_S = 0.2
_END_QUERY_TIMEOUT_S = 5.0
_SAMPLE = 20


class LedgerError(RuntimeError):
    """The ledger could not read its topics (missing topic, broker unreachable)."""


@dataclass(frozen=True)
class LedgerTotals:
    """What the ledger found. Counts are of input events unless said otherwise."""

    events: int
    answered_once: int
    duplicated: int
    # Answers beyond the first, summed over the duplicated events.
    extra_answers: int
    lost: int
    # Events whose first answer is a suggestion; DLQ records by the reason of the first.
    suggested: int
    dead_lettered: dict[str, int]
    keys: int
    keys_out_of_order: int
    # Answers (suggestions or DLQ records) that name no input event.
    foreign: int
    # Samples, for a failure message: "partition:offset".
    lost_sample: tuple[str, ...] = ()
    duplicated_sample: tuple[str, ...] = ()

    @property
    def dead_lettered_total(self) -> int:
        return sum(self.dead_lettered.values())

    def line(self) -> str:
        """One line: the totals an operator reads first."""
        dlq = ",".join(f"{r}={n}" for r, n in sorted(self.dead_lettered.items())) or "-"
        return (
            f"events={self.events} once={self.answered_once} lost={self.lost} "
            f"duplicated={self.duplicated} (+{self.extra_answers} answers) "
            f"suggested={self.suggested} dlq={self.dead_lettered_total} [{dlq}] "
            f"keys_out_of_order={self.keys_out_of_order}/{self.keys} foreign={self.foreign}"
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dead_lettered_total"] = self.dead_lettered_total
        return data


@dataclass
class InputRecord:
    key: bytes | None
    event_id: str | None


@dataclass
class LedgerRecords:
    """Everything read so far, unresolved: answers may arrive before their inputs."""

    inputs: dict[Position, InputRecord] = field(default_factory=dict)
    by_event_id: dict[str, list[Position]] = field(default_factory=lambda: defaultdict(list))
    # (output partition, output offset, source event id)
    suggestions: list[tuple[int, int, str]] = field(default_factory=list)
    # (original position or None, reason, event id inside the value or None)
    dead_letters: list[tuple[Position | None, str, str | None]] = field(default_factory=list)


def tally(records: LedgerRecords) -> LedgerTotals:
    """Resolve every answer to its input event and count. Pure; see the module doc."""
    answers: Counter[Position] = Counter()
    first_kind: dict[Position, str] = {}
    foreign = 0

    # Suggestions, in output order per partition (also the order check's input).
    by_output: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for out_partition, out_offset, event_id in records.suggestions:
        by_output[out_partition].append((out_offset, event_id))
    shared: Counter[str] = Counter()
    firsts_by_key: dict[bytes | None, list[Position]] = defaultdict(list)
    for out_partition in sorted(by_output):
        for _offset, source_id in sorted(by_output[out_partition]):
            positions = records.by_event_id.get(source_id)
            if not positions:
                foreign += 1
                continue
            # One event id at several input offsets: hand its answers out in turn.
            position = positions[min(shared[source_id], len(positions) - 1)]
            shared[source_id] += 1
            answers[position] += 1
            if position not in first_kind:
                first_kind[position] = "suggested"
                firsts_by_key[records.inputs[position].key].append(position)

    dlq_by_reason: Counter[str] = Counter()
    for original, reason, value_id in records.dead_letters:
        found = original if original in records.inputs else None
        if found is None and value_id is not None and records.by_event_id.get(value_id):
            found = records.by_event_id[value_id][0]
        if found is None:
            foreign += 1
            continue
        answers[found] += 1
        if found not in first_kind:
            first_kind[found] = reason

    once = duplicated = extra = suggested = 0
    lost: list[Position] = []
    duplicates: list[Position] = []
    for position in sorted(records.inputs):
        count = answers.get(position, 0)
        if count == 0:
            lost.append(position)
            continue
        if count == 1:
            once += 1
        else:
            duplicated += 1
            extra += count - 1
            duplicates.append(position)
        kind = first_kind[position]
        if kind == "suggested":
            suggested += 1
        else:
            dlq_by_reason[kind] += 1

    keys = {i.key for i in records.inputs.values()}
    out_of_order = sum(1 for firsts in firsts_by_key.values() if firsts != sorted(firsts))
    return LedgerTotals(
        events=len(records.inputs),
        answered_once=once,
        duplicated=duplicated,
        extra_answers=extra,
        lost=len(lost),
        suggested=suggested,
        dead_lettered=dict(dlq_by_reason),
        keys=len(keys),
        keys_out_of_order=out_of_order,
        foreign=foreign,
        lost_sample=tuple(f"{p}:{o}" for p, o in lost[:_SAMPLE]),
        duplicated_sample=tuple(f"{p}:{o}" for p, o in duplicates[:_SAMPLE]),
    )


class Ledger:
    """An incremental, read_committed reader of the three topics."""

    def __init__(
        self,
        kafka_config: Mapping[str, Any],
        *,
        input_topic: str,
        output_topic: str,
        dlq_topic: str,
        codec: EventCodec | None = None,
    ) -> None:
        """`kafka_config`: librdkafka connection properties (bootstrap, security)."""
        self.input_topic = input_topic
        self.output_topic = output_topic
        self.dlq_topic = dlq_topic
        self._codec = codec or EventCodec(input_topic=input_topic, output_topic=output_topic)
        conf = dict(kafka_config) | {
            # Assigned, never subscribed: the group id is required but never joins or commits.
            "group.id": f"ledger-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            # Quick answers at the end of a partition; the ledger polls, it is not a service.
            "fetch.wait.max.ms": 100,
        }
        self._consumer = Consumer(conf)
        self._kafka_config = dict(kafka_config)
        self._admin = AdminClient(self._kafka_config)
        self._records = LedgerRecords()
        self._partitions: list[TopicPartition] = []
        self._assigned = False
        # After a `refresh` that returned False: which partitions it could not finish.
        self.behind: list[str] = []

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()

    def refresh(self, timeout_s: float = 60.0) -> bool:
        """Read up to the current read_committed end of every partition.

        Returns True when every partition reached the end it had when the call began,
        False when `timeout_s` ran out first (an open transaction holds the end back, or
        the broker is away). Raises `LedgerError` when a topic does not exist.
        """
        self._assign()
        deadline = time.monotonic() + timeout_s
        targets: dict[tuple[str, int], int] | None = None
        self.behind = ["(the ends of the partitions are not known)"]
        while True:
            # Read first: a pass never returns without one poll (a caller that polls the
            # ledger in a loop does not spin).
            for message in self._consumer.consume(num_messages=1000, timeout=_POLL_S):
                self._take(message)
            if targets is None:
                # Asked again on every pass until the broker answers (a new topic's leader
                # may be unknown for a moment, a restarting broker for longer).
                targets = self._ends(deadline)
            if targets is not None:
                positions = self._consumer.position(self._partitions)
                behind = [
                    tp
                    for tp in positions
                    if targets.get((tp.topic, tp.partition), 0) > max(tp.offset, 0)
                ]
                self.behind = [
                    f"{tp.topic}[{tp.partition}] at {tp.offset} of "
                    f"{targets.get((tp.topic, tp.partition))}"
                    for tp in behind
                ]
                if not behind:
                    return True
            if time.monotonic() >= deadline:
                return False

    def totals(self) -> LedgerTotals:
        return tally(self._records)

    def _assign(self) -> None:
        if self._assigned:
            return
        try:
            metadata = self._consumer.list_topics(timeout=10)
        except KafkaException as exc:
            raise LedgerError(f"cannot read the topic list: {exc}") from exc
        partitions = []
        for topic in (self.input_topic, self.output_topic, self.dlq_topic):
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise LedgerError(f"topic {topic!r} does not exist")
            partitions += [TopicPartition(topic, p, -2) for p in sorted(found.partitions)]
        self._partitions = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        self._consumer.assign(partitions)
        self._assigned = True

    def _ends(self, deadline: float) -> dict[tuple[str, int], int] | None:
        """Each partition's last stable offset: its end as a read_committed reader sees it.

        One request for all partitions, on the admin client's own connection (the
        consumer's is busy with long-polling fetches). None when the broker did not answer
        before `deadline` (it may be restarting).
        """
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        specs = {TopicPartition(tp.topic, tp.partition): latest for tp in self._partitions}
        timeout = max(1.0, min(deadline - time.monotonic(), _END_QUERY_TIMEOUT_S))
        try:
            futures = self._admin.list_offsets(
                specs, isolation_level=IsolationLevel.READ_COMMITTED, request_timeout=timeout
            )
            ends = {}
            for tp, future in futures.items():
                # The request timeout does not cover a broker that is down: bound it here.
                ends[(tp.topic, tp.partition)] = future.result(timeout=timeout + 1).offset
            return ends
        except (KafkaException, TimeoutError, SystemError):
            # Not known now (a broker restarting, a new topic's leader not yet elected).
            # SystemError: how the binding reports some refusals (no broker up).
            pass
        # The admin client keeps the leader epochs it saw: after a broker restart it is
        # refused ("fenced leader epoch") until replaced.
        self._admin = AdminClient(self._kafka_config)
        return None

    def _take(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                return
            if error.fatal() or error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise LedgerError(f"reading failed: {error.str()}")
            return  # transient (broker away): librdkafka retries by itself
        topic = message.topic()
        partition = message.partition() or 0
        offset = message.offset() or 0
        value = message.value()
        if topic == self.input_topic:
            event_id = self._event_id(value)
            self._records.inputs[(partition, offset)] = InputRecord(message.key(), event_id)
            if event_id is not None:
                self._records.by_event_id[event_id].append((partition, offset))
        elif topic == self.output_topic:
            try:
                suggestion = self._codec.decode_suggestion(value)
            except (EventDecodeError, RegistryError):
                self._records.suggestions.append((partition, offset, "undecodable"))
                return
            self._records.suggestions.append((partition, offset, str(suggestion.source_event_id)))
        else:
            self._take_dead_letter(message)

    def _take_dead_letter(self, message: Message) -> None:
        original: Position | None = None
        reason = "dlq_headers_invalid"
        try:
            info = parse_dlq_headers(message.headers())
        except EventDecodeError:
            pass
        else:
            reason = info.reason
            if info.original_topic == self.input_topic:
                original = (info.original_partition, info.original_offset)
        self._records.dead_letters.append((original, reason, self._event_id(message.value())))

    def _event_id(self, value: bytes | None) -> str | None:
        try:
            return str(self._codec.decode_uploaded(value).event_id)
        except (EventDecodeError, RegistryError):
            return None


def read_ledger(
    kafka_config: Mapping[str, Any],
    *,
    input_topic: str,
    output_topic: str,
    dlq_topic: str,
    codec: EventCodec | None = None,
    timeout_s: float = 60.0,
) -> tuple[LedgerTotals, bool]:
    """Read the three topics once to their ends; returns the totals and whether the end
    was reached within `timeout_s`."""
    with Ledger(
        kafka_config,
        input_topic=input_topic,
        output_topic=output_topic,
        dlq_topic=dlq_topic,
        codec=codec,
    ) as ledger:
        complete = ledger.refresh(timeout_s)
        return ledger.totals(), complete


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", help="input topic (default: the service's setting)")
    parser.add_argument("--output", help="output topic (default: the service's setting)")
    parser.add_argument("--dlq", help="dead-letter topic (default: the service's setting)")
    parser.add_argument("--bootstrap", help="bootstrap servers (default: the service's setting)")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="give up reading after")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the ledger for parsed `add_arguments` options; returns the exit status."""
    kafka = settings.kafka
    conf = kafka.common_config()
    if args.bootstrap:
        conf["bootstrap.servers"] = args.bootstrap
    input_topic = args.input or kafka.input_topic
    output_topic = args.output or kafka.output_topic
    # Decoding needs no subject names: the registry is asked by schema id when there is one.
    codec = codec_from_settings(settings)
    try:
        totals, complete = read_ledger(
            conf,
            input_topic=input_topic,
            output_topic=output_topic,
            dlq_topic=args.dlq or kafka.dlq_topic,
            codec=codec,
            timeout_s=args.timeout_s,
        )
    except LedgerError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(totals.as_dict() | {"complete": complete}, indent=2, sort_keys=True))
    else:
        print(totals.line())
        if not complete:
            print("(incomplete: the end of a partition was not reached in time)")
        if totals.lost_sample:
            print("lost (partition:offset):", " ".join(totals.lost_sample))
        if totals.duplicated_sample:
            print("duplicated (partition:offset):", " ".join(totals.duplicated_sample))
    return 0 if complete and totals.lost == 0 and totals.duplicated == 0 else 1
