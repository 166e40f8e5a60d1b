"""The pipeline's wiring with fakes for every I/O step: outcomes, offsets, back-pressure."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from confluent_kafka import Message

from category_suggester.app import Pipeline, confidence_threshold
from category_suggester.delivery.at_least_once import AtLeastOnce
from category_suggester.errors import FetchFailedError, PublishError, RecordTooLargeError
from category_suggester.events import parse_dlq_headers
from category_suggester.fetch import FetchedImage
from category_suggester.infer import ModelInfo
from category_suggester.metrics import Metrics
from category_suggester.settings import ConsumerSettings, Settings
from tests.support import pipeline as support
from tests.support.pipeline import (
    CODEC,
    LABELS,
    TOPIC,
    FakeBatcher,
    FakeSource,
    GatedFetcher,
    pipeline_settings,
)


@dataclass
class FakePublisher:
    failures: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    records: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = field(
        default_factory=list
    )

    async def publish(self, topic, key, value, headers=()) -> None:  # type: ignore[no-untyped-def]
        if self.failures > 0:
            self.failures -= 1
            raise PublishError("broker down")
        self.records.append((topic, key, value, list(headers)))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        while len(self.records) < count:
            self.changed.clear()
            await self.changed.wait()


def message(offset: int, url: str = "http://origin/a.jpg", partition: int = 0) -> Message:
    return support.message(offset, url, partition, headers=[("trace", b"abc")])


def make_pipeline(
    *,
    fetcher: GatedFetcher | None = None,
    batcher: FakeBatcher | None = None,
    publisher: FakePublisher | None = None,
    consumer: ConsumerSettings | None = None,
) -> tuple[Pipeline, FakePublisher, FakeSource, Metrics]:
    settings = pipeline_settings(consumer=consumer or ConsumerSettings())
    publisher = publisher or FakePublisher()
    source = FakeSource()
    pipeline, _delivery, metrics = support.make_pipeline(
        settings,
        lambda metrics, stop: AtLeastOnce(
            settings,
            metrics,
            publisher,  # type: ignore[arg-type]
            source=source,  # type: ignore[arg-type]
            stop=stop,
        ),
        source,
        fetcher=fetcher,
        batcher=batcher,
    )
    return pipeline, publisher, source, metrics


async def test_good_and_bad_events_each_get_exactly_one_answer() -> None:
    pipeline, publisher, source, metrics = make_pipeline()
    good, refused = message(0), message(1, "http://refused/x.jpg")
    garbage = Message(topic=TOPIC, partition=0, offset=2, key=b"k", value=b"\x00junk")
    pipeline.on_messages([good, refused, garbage])
    assert await pipeline.wait_idle(5)

    by_topic: dict[str, list] = {}
    for record in publisher.records:
        by_topic.setdefault(record[0], []).append(record)
    assert len(by_topic["out"]) == 1
    assert len(by_topic["dlq"]) == 2
    suggestion = CODEC.decode_suggestion(by_topic["out"][0][2])
    assert suggestion.category == "car"
    assert suggestion.model_version == "3"
    assert suggestion.scores[0].category == "car"
    assert by_topic["out"][0][1] == good.key()

    dlq = {r[1]: r for r in by_topic["dlq"]}
    refused_record = dlq[refused.key()]
    assert refused_record[2] == refused.value()
    assert ("trace", b"abc") in refused_record[3]
    assert parse_dlq_headers(refused_record[3]).reason == "address_refused"
    assert parse_dlq_headers(dlq[b"k"][3]).stage == "decode_event"

    assert source.stored[-1] == {(TOPIC, 0): 3}
    assert metrics.events.labels(outcome="suggested")._value.get() == 1
    assert metrics.events.labels(outcome="dead_lettered")._value.get() == 2


async def test_offsets_are_stored_only_past_finished_prefixes() -> None:
    fetcher = GatedFetcher()
    fetcher.gates["http://origin/slow.jpg"] = gate = asyncio.Event()
    pipeline, publisher, source, _ = make_pipeline(fetcher=fetcher)
    pipeline.on_messages([message(10, "http://origin/slow.jpg"), message(11), message(12)])
    publisher.changed = asyncio.Event()
    await asyncio.wait_for(publisher.wait_for(2), 5)
    assert source.stored == []  # 11 and 12 are done, but 10 is not
    gate.set()
    assert await pipeline.wait_idle(5)
    assert source.stored == [{(TOPIC, 0): 13}]


async def test_outages_are_retried_in_place_and_never_dead_lettered() -> None:
    batcher = FakeBatcher(failures=3)
    publisher = FakePublisher(failures=2)
    pipeline, publisher, source, metrics = make_pipeline(batcher=batcher, publisher=publisher)
    pipeline.on_messages([message(0)])
    assert await pipeline.wait_idle(5)
    assert [r[0] for r in publisher.records] == ["out"]
    assert batcher.calls == 4
    assert metrics.retries.labels(stage="infer")._value.get() == 3
    assert metrics.retries.labels(stage="publish")._value.get() == 2
    assert source.stored == [{(TOPIC, 0): 1}]


async def test_events_are_released_to_the_source_once_answered() -> None:
    fetcher = GatedFetcher()
    fetcher.gates["http://origin/held.jpg"] = gate = asyncio.Event()
    pipeline, _, source, _ = make_pipeline(fetcher=fetcher)
    pipeline.on_messages([message(i, "http://origin/held.jpg") for i in range(4)])
    await asyncio.sleep(0)
    assert source.released == 0
    gate.set()
    assert await pipeline.wait_idle(5)
    assert source.released == 4


async def test_messages_refused_at_shutdown_are_released_at_once() -> None:
    pipeline, _, source, _ = make_pipeline()
    pipeline.stop_intake()
    pipeline.on_messages([message(i) for i in range(3)])
    assert source.released == 3
    assert pipeline.inflight == 0


async def test_revoke_waits_for_the_moving_partitions_work_then_returns_its_offsets() -> None:
    fetcher = GatedFetcher()
    fetcher.gates["http://origin/held.jpg"] = gate = asyncio.Event()
    pipeline, _, _, _ = make_pipeline(fetcher=fetcher)
    pipeline.on_messages([message(0, partition=1), message(1, "http://origin/held.jpg", 1)])
    revoke = asyncio.create_task(pipeline.on_revoked([(TOPIC, 1)]))
    await asyncio.sleep(0)
    assert not revoke.done()
    gate.set()
    assert await revoke == {(TOPIC, 1): 2}


async def test_a_stuck_event_is_abandoned_after_the_grace_period_without_its_offset() -> None:
    fetcher = GatedFetcher()
    fetcher.gates["http://origin/held.jpg"] = asyncio.Event()  # never set
    pipeline, _, _, _ = make_pipeline(
        fetcher=fetcher, consumer=ConsumerSettings(shutdown_grace_s=0.05)
    )
    pipeline.on_messages([message(0), message(1, "http://origin/held.jpg"), message(2)])
    assert await pipeline.on_revoked([(TOPIC, 0)]) == {(TOPIC, 0): 1}
    assert await pipeline.wait_idle(5)


@pytest.mark.parametrize("offset", [0, 7])
async def test_inflight_gauge_returns_to_zero(offset: int) -> None:
    pipeline, _, _, metrics = make_pipeline()
    pipeline.on_messages([message(offset)])
    assert metrics.inflight._value.get() == 1
    assert await pipeline.wait_idle(5)
    assert metrics.inflight._value.get() == 0


@pytest.mark.parametrize(
    ("env", "model_threshold", "expected"),
    [
        ({}, None, 0.5),
        ({}, 0.83, 0.83),
        ({"SUGGESTER_POSTPROCESS__CONFIDENCE_THRESHOLD": "0.7"}, 0.83, 0.7),
    ],
)
def test_threshold_is_the_setting_if_set_else_the_models_else_the_default(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], model_threshold: float | None,
    expected: float,
) -> None:  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = ModelInfo("m", "1", 8, 4, LABELS, confidence_threshold=model_threshold)
    assert confidence_threshold(Settings(), model) == expected


async def test_an_event_too_large_to_dead_letter_whole_goes_without_its_value() -> None:
    pipeline, publisher, source, _ = make_pipeline()
    huge = Message(
        topic=TOPIC, partition=0, offset=0, key=b"k", value=b"\xc3\x01" + b"x" * 2_200_000
    )
    pipeline.on_messages([huge])
    assert await pipeline.wait_idle(5)
    ((topic, key, value, headers),) = publisher.records
    assert (topic, key, value) == ("dlq", b"k", b"")
    assert dict(headers)["dlq.value.omitted"] == b"2200002"
    assert parse_dlq_headers(headers).reason == "event_too_large"
    assert source.stored == [{(TOPIC, 0): 1}]


async def test_a_dlq_record_the_broker_refuses_as_too_large_is_resent_without_its_value() -> None:
    class RefusesLarge(FakePublisher):
        async def publish(self, topic, key, value, headers=()) -> None:  # type: ignore[no-untyped-def]
            if len(value) > 1000:
                raise RecordTooLargeError("record too large")
            await super().publish(topic, key, value, headers)

    pipeline, publisher, _, _ = make_pipeline(publisher=RefusesLarge())
    pipeline.on_messages([Message(topic=TOPIC, partition=0, offset=0, key=b"k", value=b"y" * 5000)])
    assert await pipeline.wait_idle(5)
    ((topic, _key, value, headers),) = publisher.records
    assert (topic, value) == ("dlq", b"")
    assert dict(headers)["dlq.value.omitted"] == b"5000"


async def test_a_fetch_failure_is_dead_lettered_with_the_attempts_the_fetch_made() -> None:
    class Unavailable(GatedFetcher):
        async def fetch(self, url: str) -> FetchedImage:
            raise FetchFailedError("HTTP 503 (attempt 3)", reason="http_status", attempts=3)

    pipeline, publisher, _, _ = make_pipeline(fetcher=Unavailable())
    pipeline.on_messages([message(0)])
    assert await pipeline.wait_idle(5)
    ((topic, _key, _value, headers),) = publisher.records
    info = parse_dlq_headers(headers)
    assert (topic, info.stage, info.reason, info.attempts) == ("dlq", "fetch", "http_status", 3)


async def test_work_abandoned_before_it_started_leaves_the_window() -> None:
    # Lost in the same loop iteration that handed the messages over: the tasks are
    # cancelled before they ever ran, and must still be booked out of the window.
    pipeline, _, source, _ = make_pipeline()
    pipeline.on_messages([message(i) for i in range(3)])
    pipeline.on_lost([(TOPIC, 0)])
    assert await pipeline.wait_idle(5)
    assert pipeline.inflight == 0
    assert source.released == 3
