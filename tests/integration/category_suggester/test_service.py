"""The service end to end on the real stack: Kafka in, Triton, Kafka out."""

from __future__ import annotations

import re

import numpy as np
import onnxruntime as ort
import pytest

from category_suggester.events import EventCodec, parse_dlq_headers
from category_suggester.preprocess import decode_image
from category_suggester.settings import FetchSettings
from devstack.kafka import KafkaBroker
from devstack.triton import TritonServer
from tests.conftest import ServedModel, ServiceFactory, Topics
from tests.support.images import photo
from tests.support.kafka import make_event, produce, produce_events, read_answers
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

CODEC = EventCodec()


def expected_scores(model: ServedModel, data: bytes) -> np.ndarray:
    session = ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])
    image = decode_image(data, size=model.image_size, max_pixels=40_000_000)
    (probabilities,) = session.run(["probabilities"], {"image": image[None]})
    return np.asarray(probabilities[0])


def test_images_in_every_format_get_the_models_suggestion(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    served_model: ServedModel,
    start_service: ServiceFactory,
) -> None:
    images = {
        f"formats/{i}.{ext}": photo(i, fmt=fmt, size=(800 + 40 * i, 600))
        for i, (ext, fmt) in enumerate([("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")] * 3)
    }
    events = {}
    for name, data in images.items():
        event = make_event(image_origin.add(name, data))
        events[str(event.event_id)] = (event, data)
    service = start_service()
    service.wait_ready()
    produce_events(kafka.bootstrap_servers, topics.input, [e for e, _ in events.values()], CODEC)

    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=len(events)
    )

    assert not answers.dead_letters, f"unexpected DLQ records: {dict(answers.dead_letters)}"
    assert set(answers.suggestions) == set(events)
    for event_id, suggestions in answers.suggestions.items():
        assert len(suggestions) == 1
        suggestion = suggestions[0]
        event, data = events[event_id]
        want = expected_scores(served_model, data)
        got = {s.category: s.score for s in suggestion.scores}
        assert [s.score for s in suggestion.scores] == sorted(got.values(), reverse=True)
        np.testing.assert_allclose([got[label] for label in served_model.labels], want, atol=1e-4)
        assert suggestion.category == served_model.labels[int(np.argmax(want))]
        assert suggestion.listing_id == event.listing_id
        assert suggestion.image_id == event.image_id
        assert suggestion.model_name == "category_classifier"
        assert suggestion.model_version == str(served_model.version)
        assert suggestion.confident == (suggestion.score >= suggestion.confidence_threshold)
        assert suggestion.timings.fetch_ms > 0
        assert suggestion.timings.total_ms >= suggestion.timings.inference_ms

    metrics = service.metrics()
    assert re.search(r'suggester_events_total\{outcome="suggested"\} 9\.0', metrics)
    for name in (
        "suggester_end_to_end_latency_seconds_bucket",
        'suggester_stage_latency_seconds_count{stage="infer"}',
        "suggester_batch_size_bucket",
        "suggester_inflight_events",
        "suggester_build_info",
    ):
        assert name in metrics
    assert service.get("/healthz")[0] == 200
    assert service.terminate() == 0


def test_every_kind_of_bad_input_lands_in_the_dlq_with_its_reason(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    good = make_event(image_origin.add("bad/good.jpg", photo(1)))

    def event_for(url: str) -> bytes:
        return CODEC.encode_uploaded(make_event(url))

    add = image_origin.add
    # key, value, reason; every case but "unavailable" fails on its first attempt.
    cases: list[tuple[bytes | None, bytes, str]] = [
        (b"garbage", b"not avro at all", "event_undecodable"),
        (b"loopback", event_for("http://127.0.0.1:1/x.jpg"), "address_refused"),
        (b"metadata", event_for("http://169.254.169.254/latest"), "address_refused"),
        (b"scheme", event_for("file:///etc/passwd"), "scheme_refused"),
        (b"missing", event_for(image_origin.url("bad/none.jpg")), "http_status"),
        (b"unavailable", event_for(image_origin.url("_/status/503")), "http_status"),
        (b"notimage", event_for(add("bad/page.jpg", b"<html>hi</html>")), "not_an_image"),
        (b"gif", event_for(add("bad/a.gif", photo(2, fmt="GIF"))), "format_refused"),
        (b"truncated", event_for(add("bad/t.jpg", photo(3)[:2000])), "image_undecodable"),
    ]
    attempts = {b"unavailable": FetchSettings().max_attempts}  # 503: retried, then given up
    service = start_service()
    service.wait_ready()
    produce(
        kafka.bootstrap_servers,
        topics.input,
        [(k, v) for k, v, _ in cases] + [(good.listing_id.encode(), CODEC.encode_uploaded(good))],
    )
    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=len(cases) + 1
    )

    assert list(answers.suggestions) == [str(good.event_id)]
    by_key = {m.key(): m for messages in answers.dead_letters.values() for m in messages}
    assert set(by_key) == {k for k, _, _ in cases}
    for key, value, reason in cases:
        record = by_key[key]
        assert record.value() == value, "the DLQ keeps the original value unchanged"
        info = parse_dlq_headers(record.headers() or [])
        assert info.reason == reason, (key, info)
        assert info.attempts == attempts.get(key, 1), (key, info)
        assert info.original_topic == topics.input
        assert info.message
    assert service.terminate() == 0


def test_triton_restart_mid_stream_loses_and_dead_letters_nothing(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    triton: TritonServer,
    start_service: ServiceFactory,
) -> None:
    urls = [image_origin.add(f"restart/{i}.jpg", photo(100 + i)) for i in range(8)]
    service = start_service()
    service.wait_ready()
    first = produce_events(
        kafka.bootstrap_servers, topics.input, [make_event(urls[i % 8]) for i in range(40)], CODEC
    )
    triton.stop()
    second = produce_events(
        kafka.bootstrap_servers, topics.input, [make_event(urls[i % 8]) for i in range(40)], CODEC
    )
    triton.start()
    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=80, settle_s=1
    )
    assert not answers.dead_letters
    assert set(answers.suggestions) == {str(e.event_id) for e in first + second}
    assert service.terminate() == 0


def test_sigterm_mid_stream_loses_nothing_and_duplicates_nothing(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    urls = [image_origin.add(f"sigterm/{i}.jpg", photo(200 + i)) for i in range(8)]
    events = produce_events(
        kafka.bootstrap_servers, topics.input, [make_event(urls[i % 8]) for i in range(300)], CODEC
    )
    # A small in-flight window, so that most events are still unread at SIGTERM.
    window = {"SUGGESTER_CONSUMER__MAX_INFLIGHT": "32", "SUGGESTER_CONSUMER__RESUME_INFLIGHT": "16"}
    first = start_service(**window)
    first.wait_ready()
    # Stop it while it is busy: the first answers prove work is in flight.
    done = read_answers(kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=20)
    assert first.terminate() == 0
    assert done.count() < 300
    second = start_service(**window)
    answers = read_answers(
        kafka.bootstrap_servers,
        topics.output,
        topics.dlq,
        CODEC,
        expect=300,
        settle_s=2,
        timeout_s=300,
    )
    assert not answers.dead_letters
    assert set(answers.suggestions) == {str(e.event_id) for e in events}
    duplicated = {k: len(v) for k, v in answers.suggestions.items() if len(v) > 1}
    assert not duplicated, f"{len(duplicated)} events answered twice"
    assert second.terminate() == 0


def test_three_processes_in_one_group_answer_every_event_once(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    urls = [image_origin.add(f"group/{i}.jpg", photo(300 + i)) for i in range(8)]
    services = [start_service() for _ in range(3)]
    for service in services:
        service.wait_ready()
    events = produce_events(
        kafka.bootstrap_servers, topics.input, [make_event(urls[i % 8]) for i in range(300)], CODEC
    )
    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=300, settle_s=2
    )
    assert not answers.dead_letters
    assert set(answers.suggestions) == {str(e.event_id) for e in events}
    assert all(len(v) == 1 for v in answers.suggestions.values())
    owned = []
    for service in services:
        assigned = re.search(r"^suggester_assigned_partitions (\d+)", service.metrics(), re.M)
        assert assigned is not None
        owned.append(int(float(assigned.group(1))))
    assert sum(owned) == topics.partitions
    assert all(n >= 1 for n in owned)
    for service in services:
        assert service.terminate() == 0
