"""The try-a-photo app (category_suggester/web.py) with aiohttp's test client, its Kafka and probes
faked; the real path is tests/integration/category_suggester/test_web_page.py."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from category_suggester.client import Answer
from category_suggester.errors import PublishError
from category_suggester.events import ListingImageUploaded
from category_suggester.fetch import ImageFetcher
from category_suggester.settings import FetchSettings, Settings, WebSettings
from category_suggester.web import PHOTOS, Readiness, create_app, origin_allowed
from tests.support.images import photo
from tests.support.kafka import make_dlq_info, make_suggestion

LIMIT = 64 * 1024
ORIGIN = "127.0.0.1:8080"


class FakeSink:
    def __init__(self) -> None:
        self.events: list[ListingImageUploaded] = []
        self.failure: BaseException | None = None

    async def publish(self, event: ListingImageUploaded) -> None:
        if self.failure is not None:
            raise self.failure
        self.events.append(event)


class FakeProbe:
    def __init__(self, service: str = "down", triton: str = "ready") -> None:
        self.service = service
        self.triton = triton

    async def readiness(self) -> Readiness:
        return Readiness(
            self.service, self.triton, "http://127.0.0.1:9108", "localhost:8001", "classifier"
        )


async def resolve(host: str) -> list[str]:
    return {"images.example.com": ["93.184.216.34"], "intranet.example.com": ["10.0.0.5"]}[host]


class Page:
    def __init__(
        self, client: TestClient[Any, Any], sink: FakeSink, probe: FakeProbe, uploads: Path
    ) -> None:
        self.client = client
        self.sink = sink
        self.probe = probe
        self.uploads = uploads

    @property
    def photos(self) -> Any:
        return self.client.app[PHOTOS]  # type: ignore[index]

    async def upload(self, data: bytes, name: str = "a.jpg") -> aiohttp.ClientResponse:
        form = aiohttp.FormData()
        form.add_field("photo", data, filename=name, content_type="application/octet-stream")
        return await self.client.post("/api/photos", data=form)

    def stored(self) -> list[Path]:
        return sorted(self.uploads.iterdir())


MakePage = Callable[..., Awaitable[Page]]


@pytest.fixture
async def make_page(tmp_path: Path) -> AsyncIterator[MakePage]:
    clients: list[TestClient[Any, Any]] = []

    async def make(answer_timeout_s: float = 30.0, upload_ttl_s: float = 600.0) -> Page:
        settings = Settings(
            fetch=FetchSettings(max_bytes=LIMIT, allowed_hosts=(ORIGIN, "127.0.0.1:8090")),
            web=WebSettings(answer_timeout_s=answer_timeout_s, upload_ttl_s=upload_ttl_s),
        )
        sink, probe = FakeSink(), FakeProbe()
        uploads = tmp_path / f"uploads-{len(clients)}"
        uploads.mkdir()
        fetcher = ImageFetcher(settings.fetch, resolver=resolve)
        app = create_app(
            settings, sink=sink, probe=probe, url_policy=fetcher.check, upload_dir=uploads
        )
        client: TestClient[Any, Any] = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return Page(client, sink, probe, uploads)

    yield make
    for client in clients:
        await client.close()


async def test_the_page_and_its_files_are_served_with_a_strict_policy(make_page: MakePage) -> None:
    page = await make_page()
    response = await page.client.get("/")
    assert response.status == 200
    html = await response.text()
    assert '<script src="/static/app.js"' in html
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    for name, kind in [("app.js", "text/javascript"), ("style.css", "text/css")]:
        response = await page.client.get(f"/static/{name}")
        assert (response.status, response.content_type) == (200, kind)
    assert (await page.client.get("/static/../web.py")).status == 404
    assert (await page.client.get("/static/secret.txt")).status == 404


async def test_an_upload_is_stored_served_and_published(make_page: MakePage) -> None:
    page = await make_page()
    data = photo(1, size=(64, 48))
    response = await page.upload(data)
    assert response.status == 202
    body = await response.json()
    (event,) = page.sink.events
    assert body["event_id"] == str(event.event_id)
    assert body["size"] == len(data)
    assert event.image_url == body["image_url"]
    assert event.image_url.startswith(f"http://{ORIGIN}/uploads/")
    (stored,) = page.stored()
    assert stored.read_bytes() == data
    served = await page.client.get(event.image_url.removeprefix(f"http://{ORIGIN}"))
    assert served.status == 200
    assert await served.read() == data


async def test_an_upload_over_the_limit_is_refused_while_it_arrives(make_page: MakePage) -> None:
    page = await make_page()
    server = page.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    boundary = "b0undary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="photo"; filename="huge.jpg"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    # A chunked body that stalls past the limit (by more than the multipart reader's
    # look-ahead) and never ends: only a check made while receiving can answer.
    writer.write(
        b"POST /api/photos HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        + f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
    )
    for chunk in (head, b"x" * (4 * LIMIT)):
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    await writer.drain()
    async with asyncio.timeout(10):
        status_line = await reader.readline()
        while (line := await reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = json.loads(await reader.readexactly(length))
        writer.close()
        await writer.wait_closed()
    assert status_line.split()[1] == b"413"
    assert body["error"] == "too_large"
    assert "0.1 MiB limit" in body["message"]
    assert "huge.jpg" in body["message"]
    assert page.stored() == []
    assert page.sink.events == []


async def test_an_upload_at_the_limit_is_taken(make_page: MakePage) -> None:
    page = await make_page()
    assert (await page.upload(b"x" * LIMIT)).status == 202


@pytest.mark.parametrize(
    ("send", "reason"),
    [
        ({"data": b"plain bytes"}, "no_photo"),
        ({"data": aiohttp.FormData({"other": "field"})}, "no_photo"),
    ],
)
async def test_a_request_without_a_photo_gets_a_clear_error(
    make_page: MakePage, send: dict[str, Any], reason: str
) -> None:
    page = await make_page()
    response = await page.client.post("/api/photos", **send)
    assert response.status == 400
    body = await response.json()
    assert body["error"] == reason
    assert "multipart/form-data field 'photo'" in body["message"]


async def test_an_empty_file_is_refused(make_page: MakePage) -> None:
    page = await make_page()
    response = await page.upload(b"", name="empty.jpg")
    assert response.status == 400
    assert (await response.json())["error"] == "empty"
    assert page.sink.events == []


async def test_the_answer_is_the_suggestion_for_the_event_and_the_upload_goes(
    make_page: MakePage,
) -> None:
    page = await make_page()
    accepted = await (await page.upload(photo(2, size=(64, 64)))).json()
    event_id = accepted["event_id"]
    for wait in ("0", "-1"):
        pending = await page.client.get(f"/api/answers/{event_id}?wait={wait}")
        assert await pending.json() == {"state": "pending", "event_id": event_id}

    other = make_suggestion(source_event_id=uuid.uuid4())
    page.photos.deliver(Answer(str(other.source_event_id), "k", suggestion=other))
    suggestion = make_suggestion(source_event_id=uuid.UUID(event_id), category="books")
    waiting = asyncio.create_task(page.client.get(f"/api/answers/{event_id}?wait=10"))
    await asyncio.sleep(0)  # let the long poll start before the answer comes
    page.photos.deliver(Answer(event_id, "k", suggestion=suggestion))
    response = await waiting
    body = await response.json()
    assert body["state"] == "suggested"
    assert body["suggestion"]["source_event_id"] == event_id
    assert body["suggestion"]["category"] == "books"
    assert body["suggestion"]["confidence_threshold"] == suggestion.confidence_threshold
    assert page.stored() == []


async def test_a_dead_letter_answers_with_its_reason(make_page: MakePage) -> None:
    page = await make_page()
    event_id = (await (await page.upload(b"hello, not a photo")).json())["event_id"]
    info = make_dlq_info(original_offset=7)
    page.photos.deliver(Answer(event_id, "k", dead_letter=info))
    body = await (await page.client.get(f"/api/answers/{event_id}")).json()
    assert body["state"] == "dead_lettered"
    assert body["dead_letter"]["reason"] == "not_an_image"
    assert body["dead_letter"]["stage"] == "fetch"
    assert page.stored() == []


async def test_no_answer_in_time_says_what_is_missing(make_page: MakePage) -> None:
    page = await make_page(answer_timeout_s=0.2)
    event_id = (await (await page.upload(photo(3, size=(64, 64)))).json())["event_id"]
    body = await (await page.client.get(f"/api/answers/{event_id}?wait=5")).json()
    assert body["state"] == "timeout"
    assert body["message"].startswith("no answer within 0 s: the service is not running")
    assert "http://127.0.0.1:9108/readyz" in body["message"]
    page.probe.service, page.probe.triton = "ready", "model_not_ready"
    body = await (await page.client.get(f"/api/answers/{event_id}")).json()
    assert "the model classifier is not ready" in body["message"]


@pytest.mark.parametrize(
    ("service", "triton", "expected"),
    [
        ("down", "ready", "the service is not running"),
        ("down", "down", "and Triton does not answer at localhost:8001"),
        ("ready", "down", "Triton does not answer at localhost:8001; the service waits"),
        ("not_ready", "ready", "the service is running but not ready"),
        ("ready", "ready", "working through a backlog"),
    ],
)
def test_readiness_names_what_is_missing(service: str, triton: str, expected: str) -> None:
    readiness = Readiness(service, triton, "http://127.0.0.1:9108", "localhost:8001", "m")
    assert expected in readiness.missing()


async def test_an_unknown_event_id_is_a_404(make_page: MakePage) -> None:
    page = await make_page()
    response = await page.client.get(f"/api/answers/{uuid.uuid4()}")
    assert response.status == 404
    assert (await response.json())["error"] == "unknown_event"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data", "address_refused"),
        ("http://127.0.0.1:9/x.jpg", "address_refused"),
        ("http://intranet.example.com/x.jpg", "address_refused"),
        ("file:///etc/passwd", "scheme_refused"),
        ("not a url", "url_invalid"),
    ],
)
async def test_a_url_the_service_would_refuse_is_not_published(
    make_page: MakePage, url: str, reason: str
) -> None:
    page = await make_page()
    response = await page.client.post("/api/urls", json={"url": url})
    assert response.status == 400
    body = await response.json()
    assert body["error"] == reason
    assert body["message"].startswith("the service would not fetch this URL: ")
    assert page.sink.events == []


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8090/photo.jpg", "https://images.example.com/p.webp"]
)
async def test_an_allowed_url_is_published_as_is(make_page: MakePage, url: str) -> None:
    page = await make_page()
    response = await page.client.post("/api/urls", json={"url": f"  {url} "})
    assert response.status == 202
    (event,) = page.sink.events
    assert event.image_url == url
    assert (await response.json())["event_id"] == str(event.event_id)


async def test_a_url_request_without_a_url_gets_a_clear_error(make_page: MakePage) -> None:
    page = await make_page()
    for payload in ({"data": b"{"}, {"json": {"url": 3}}, {"json": ["x"]}):
        response = await page.client.post("/api/urls", **payload)
        assert response.status == 400
        assert (await response.json())["error"] == "no_url"


async def test_kafka_refusing_the_event_is_said_and_the_upload_removed(
    make_page: MakePage,
) -> None:
    page = await make_page()
    page.sink.failure = PublishError("delivery failed: broker down")
    response = await page.upload(photo(4, size=(64, 64)))
    assert response.status == 503
    body = await response.json()
    assert body["error"] == "publish_failed"
    assert "broker down" in body["message"]
    assert page.stored() == []


async def test_a_bug_answers_json_without_a_traceback(make_page: MakePage) -> None:
    page = await make_page()
    page.sink.failure = RuntimeError("a bug")
    response = await page.upload(photo(5, size=(64, 64)))
    assert response.status == 500
    text = await response.text()
    assert "Traceback" not in text
    assert (await response.json())["error"] == "internal_error"


async def test_the_sweep_removes_old_uploads_and_forgets_old_photos(make_page: MakePage) -> None:
    page = await make_page(upload_ttl_s=60)
    event_id = (await (await page.upload(photo(6, size=(64, 64)))).json())["event_id"]
    leftover = page.uploads / ("0" * 32)  # a file an earlier run left behind
    leftover.write_bytes(b"old")
    old = time.time() - 120
    os.utime(leftover, (old, old))
    assert page.photos.sweep() == 1
    assert [p.name for p in page.stored()] != [leftover.name]
    assert not leftover.exists()
    assert page.photos.get(event_id) is not None
    page.photos.get(event_id).published_at -= 120
    (stored,) = page.stored()
    os.utime(stored, (old, old))
    assert page.photos.sweep() == 1
    assert page.photos.get(event_id) is None
    assert page.stored() == []


async def test_status_reports_readiness_and_limits(make_page: MakePage) -> None:
    page = await make_page()
    body = await (await page.client.get("/api/status")).json()
    assert body["service"] == "down"
    assert body["triton"] == "ready"
    assert body["max_bytes"] == LIMIT
    assert body["upload_origin"] == ORIGIN
    assert body["upload_origin_allowed"] is True


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [((ORIGIN,), True), (("127.0.0.1",), True), (("127.0.0.1:8090",), False), ((), False)],
)
def test_the_upload_origin_must_be_an_allowed_host(
    allowed: tuple[str, ...], expected: bool
) -> None:
    settings = Settings(fetch=FetchSettings(allowed_hosts=allowed), web=WebSettings(port=8080))
    assert origin_allowed(settings) is expected
