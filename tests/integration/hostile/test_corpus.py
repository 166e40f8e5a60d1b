"""The whole hostile-input corpus through one real service process, in one batch.

Every case ends in exactly one answer: a suggestion (odd but valid images, scored exactly
as onnxruntime scores `decode_image` of the same bytes; EXIF-rotated images scored as their
upright twin) or a DLQ record with the case's reason and the original value unchanged.
Hostile URLs aim at a canary listener on loopback in every spelling; it must see no
connection at all. The service's peak memory stays bounded.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from confluent_kafka import Message, Producer
from PIL import Image

from category_suggester.events import EventCodec, parse_dlq_headers
from category_suggester.preprocess import decode_image
from devstack.kafka import KafkaBroker
from tests.conftest import ServedModel, ServiceFactory, Topics
from tests.corpus import SUGGESTED
from tests.corpus.events import event_cases
from tests.corpus.images import image_cases, picture
from tests.corpus.urls import RESPONSE_FILES, RESPONSE_PATHS, url_cases
from tests.integration.hostile.servers import Canary, HostileOrigin
from tests.support.kafka import make_event, read_answers
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

CODEC = EventCodec()
MAX_PIXELS = 40_000_000  # the service's default decode.max_pixels
# Peak resident memory of the service process after the whole corpus (it decodes images of
# up to 40 MP on two threads; a pixel bomb that got decoded would take gigabytes).
SERVICE_PEAK_RSS = 1536 * 1024 * 1024
# Per-suggestion decode time as the pipeline saw it: the decode and the wait for one of the
# two decode threads, while the whole corpus arrives at once. The bound on one decode alone
# (2 s) is checked in tests/corpus/test_decode_bounds.py.
DECODE_BOUND_MS = 5000

# Quicker fetch limits so stalls and drips end sooner (with room for a loaded machine);
# everything else keeps its default.
FETCH_LIMITS = {
    "SUGGESTER_FETCH__CONNECT_TIMEOUT_S": "2",
    "SUGGESTER_FETCH__READ_TIMEOUT_S": "2",
    "SUGGESTER_FETCH__TOTAL_TIMEOUT_S": "6",
    "SUGGESTER_FETCH__BACKOFF_BASE_S": "0.05",
}


@dataclass(frozen=True)
class Case:
    name: str
    value: bytes | None
    expect: str
    event_id: str | None = None  # for values that decode
    listing_id: str | None = None
    image: bytes | None = None  # suggested: the bytes the scores must come from
    twin: str | None = None  # suggested: a case whose scores must be the same


def _event_case(name: str, url: str, expect: str, image: bytes | None = None) -> Case:
    event = make_event(url, listing_id=f"hostile-{name}")
    return Case(
        name,
        CODEC.encode_uploaded(event),
        expect,
        event_id=str(event.event_id),
        listing_id=event.listing_id,
        image=image,
    )


def build_corpus(canary: Canary, origin: ImageOrigin, hostile: HostileOrigin) -> list[Case]:
    photo = io.BytesIO()
    picture(99).save(photo, "JPEG")
    good = photo.getvalue()
    good_url = origin.add("hostile/good.jpg", good)
    cases: list[Case] = []
    for ev in event_cases(good_url):
        cases.append(
            Case(
                f"event/{ev.name}",
                ev.value,
                ev.expect,
                listing_id=ev.listing_id,
                image=good if ev.expect == SUGGESTED else None,
            )
        )
    for name, url, expect in url_cases(canary.port, origin.host_port):
        cases.append(_event_case(name, url, expect))
    for name, path, expect in RESPONSE_PATHS:
        cases.append(_event_case(name, hostile.url(path), expect))
    bodies = {
        "jpeg": good,
        "png": _reencode(good, "PNG"),
        "webp": _reencode(good, "WEBP"),
        "html": b"<!doctype html><html><body><img src=x.jpg></body></html>",
        "empty": b"",
        "truncated-jpeg": good[: len(good) // 3],
    }
    for name, content_type, body, expect in RESPONSE_FILES:
        url = hostile.add(name, bodies[body], content_type)
        image = bodies[body] if expect == SUGGESTED else None
        cases.append(_event_case(f"response/{name}", url, expect, image))
    for image_case in image_cases():
        url = origin.add(f"hostile/{image_case.name}", image_case.data)
        image = image_case.data if image_case.expect == SUGGESTED else None
        case = _event_case(f"image/{image_case.name}", url, image_case.expect, image)
        if image_case.upright is not None:
            twin = f"image/{image_case.name}.upright"
            upright_url = origin.add(f"hostile/{image_case.name}.upright", image_case.upright)
            cases.append(_event_case(twin, upright_url, SUGGESTED, image_case.upright))
            case = Case(**{**case.__dict__, "twin": twin})
        cases.append(case)
    assert len({c.name for c in cases}) == len(cases)
    return cases


def _reencode(data: bytes, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, fmt)
    return out.getvalue()


def _produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes, bytes | None]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0, "test events were not acknowledged"


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def test_every_hostile_input_gets_its_one_expected_answer(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    hostile_origin: HostileOrigin,
    canary: Canary,
    served_model: ServedModel,
    start_service: ServiceFactory,
) -> None:
    cases = build_corpus(canary, image_origin, hostile_origin)
    service = start_service(
        SUGGESTER_FETCH__ALLOWED_HOSTS=f"{image_origin.host_port},{hostile_origin.host_port}",
        **FETCH_LIMITS,
    )
    service.wait_ready()
    _produce(kafka.bootstrap_servers, topics.input, ((c.name.encode(), c.value) for c in cases))
    answers = read_answers(
        kafka.bootstrap_servers,
        topics.output,
        topics.dlq,
        CODEC,
        expect=len(cases),
        settle_s=1,
        timeout_s=150,
    )

    by_event = {c.event_id: c for c in cases if c.event_id is not None}
    by_listing = {c.listing_id: c for c in cases if c.listing_id is not None}
    dead: dict[str, list[Message]] = {}
    for messages in answers.dead_letters.values():
        for message in messages:
            dead.setdefault((message.key() or b"").decode(), []).append(message)
    suggested: dict[str, list[float]] = {}
    problems: list[str] = []
    for event_id, suggestions in answers.suggestions.items():
        listing_id = suggestions[0].listing_id
        case = by_event.get(event_id) or by_listing.get(listing_id)
        if case is None:
            problems.append(f"a suggestion for an unknown event {event_id}")
            continue
        if len(suggestions) != 1:
            problems.append(f"{case.name}: {len(suggestions)} suggestions")
        suggestion = suggestions[0]
        if case.expect != SUGGESTED:
            problems.append(f"{case.name}: suggested, expected DLQ reason {case.expect}")
            continue
        assert suggestion.listing_id == case.listing_id, case.name
        scores = {s.category: s.score for s in suggestion.scores}
        suggested[case.name] = [scores[label] for label in served_model.labels]
        if suggestion.timings.preprocess_ms > DECODE_BOUND_MS:
            problems.append(f"{case.name}: decode took {suggestion.timings.preprocess_ms:.0f} ms")
    for case in cases:
        records = dead.get(case.name, [])
        if case.expect == SUGGESTED:
            if case.name not in suggested:
                problems.append(f"{case.name}: not suggested; DLQ: {_reasons(records)}")
            continue
        if len(records) != 1:
            problems.append(f"{case.name}: {len(records)} DLQ records, expected {case.expect}")
            continue
        info = parse_dlq_headers(records[0].headers() or [])
        if info.reason != case.expect:
            problems.append(
                f"{case.name}: DLQ reason {info.reason} ({info.message[:120]}), "
                f"expected {case.expect}"
            )
        if (records[0].value() or b"") != (case.value or b""):
            problems.append(f"{case.name}: the DLQ record's value was changed")
    assert not problems, "\n".join([*problems, "service log:", service.log_tail(30)])

    # Good-but-odd images: exactly the scores of the model on decode_image of those bytes.
    session = ort.InferenceSession(str(served_model.onnx_path), providers=["CPUExecutionProvider"])
    reference: dict[bytes, npt.NDArray[np.float32]] = {}
    for case in cases:
        if case.expect != SUGGESTED:
            continue
        assert case.image is not None
        if case.image not in reference:
            pixels = decode_image(case.image, size=served_model.image_size, max_pixels=MAX_PIXELS)
            (probabilities,) = session.run(["probabilities"], {"image": pixels[None]})
            reference[case.image] = np.asarray(probabilities[0])
        np.testing.assert_allclose(
            suggested[case.name], reference[case.image], atol=1e-4, err_msg=case.name
        )
        if case.twin is not None:
            # EXIF-rotated: the same scores as the physically upright picture.
            np.testing.assert_allclose(
                suggested[case.name], suggested[case.twin], atol=1e-6, err_msg=case.name
            )

    assert canary.seen() == [], "a hostile URL reached the canary listener"
    # The control: the canary does record a connection on each of its addresses.
    for host in ("127.0.0.1", "::1"):
        socket.create_connection((host, canary.port), timeout=5).close()
    assert wait_for(lambda: len(canary.seen()) == 2, 5), canary.seen()
    peak = _peak_rss(service.pid)
    assert peak < SERVICE_PEAK_RSS, f"service peak RSS {peak / 2**20:.0f} MiB"
    assert service.terminate() == 0


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling a condition, not synchronising on time
    return True


def _reasons(records: list[Message]) -> list[str]:
    return [parse_dlq_headers(r.headers() or []).reason for r in records]
