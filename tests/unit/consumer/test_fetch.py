"""Unit tests of the fetch step: httpx.MockTransport, a fake resolver, a fake S3 client."""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from ipaddress import ip_address
from typing import Any

import httpcore
import httpx
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.response import StreamingBody
from PIL import Image

from consumer.errors import FetchFailedError, FetchRefusedError
from consumer.fetch import (
    PIN_EXTENSION,
    ImageFetcher,
    PinnedAddresses,
    PinnedTransport,
    address_refusal,
)
from consumer.settings import FetchSettings

PUBLIC_IP = "93.184.216.34"
Handler = Callable[[httpx.Request], httpx.Response]


def image_bytes(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG")
WEBP = image_bytes("WEBP")
GIF = image_bytes("GIF")


class FakeResolver:
    """Answers from a table; unknown names resolve to a public address."""

    def __init__(self, table: Mapping[str, Sequence[str]] | None = None) -> None:
        self.table = dict(table or {})
        self.calls: list[str] = []

    async def __call__(self, host: str) -> Sequence[str]:
        self.calls.append(host)
        answer = self.table.get(host, [PUBLIC_IP])
        if isinstance(answer, BaseException):
            raise answer
        return answer


class Harness:
    """An ImageFetcher wired to a MockTransport that records every request it sees."""

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        resolver: FakeResolver | None = None,
        s3: Any = None,
        **settings: Any,
    ) -> None:
        self.requests: list[httpx.Request] = []
        self.delays: list[float] = []
        self.resolver = resolver or FakeResolver()
        self._handler = handler or (lambda request: httpx.Response(200, content=PNG))
        defaults: dict[str, Any] = {"backoff_base_s": 0.1, "backoff_max_s": 2.0}
        defaults.update(settings)
        self.fetcher = ImageFetcher(
            FetchSettings(**defaults),
            transport=httpx.MockTransport(self._record),
            resolver=self.resolver,
            s3_client_factory=(lambda: s3) if s3 is not None else None,
            sleep=self._sleep,
            jitter=lambda: 1.0,
        )

    def _record(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._handler(request)

    async def _sleep(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    made = Harness()
    yield made
    await made.fetcher.aclose()


async def refused(harness: Harness, url: str) -> FetchRefusedError:
    with pytest.raises(FetchRefusedError) as caught:
        await harness.fetcher.fetch(url)
    return caught.value


# -- refusals before any request ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme_refused"),
        ("gopher://example.com:70/_GET", "scheme_refused"),
        ("ftp://example.com/a.png", "scheme_refused"),
        ("javascript:alert(1)", "scheme_refused"),
        ("example.com/a.png", "url_invalid"),
        ("http:///a.png", "url_invalid"),
        ("http://user:secret@example.com/a.png", "url_invalid"),
        ("http://user@example.com/a.png", "url_invalid"),
        ("http://@example.com/a.png", "url_invalid"),
        ("http://example.com/" + "a" * 2100, "url_invalid"),
        ("http://exa mple.com/a.png", "url_invalid"),
        ("http://example.com\\@evil.com/", "url_invalid"),
        ("http://ex%20ample.com/a.png", "url_invalid"),
        ("http://example.com:0/a.png", "url_invalid"),
        ("http://example.com:99999/a.png", "url_invalid"),
        ("http://[fe80::1%25eth0]/a.png", "url_invalid"),
        ("http://1.2.3.4.5/a.png", "url_invalid"),
        ("http://08.0.0.1/a.png", "url_invalid"),
        ("http://0x/a.png", "url_invalid"),
        ("http://example.123/a.png", "url_invalid"),
        ("http://127.0.0.1/a.png", "address_refused"),
        ("http://127.1/a.png", "address_refused"),
        ("http://2130706433/a.png", "address_refused"),
        ("http://017700000001/a.png", "address_refused"),
        ("http://0x7f.0.0.1/a.png", "address_refused"),
        ("http://127.0.0.1./a.png", "address_refused"),
        ("http://169.254.169.254/latest/meta-data/", "address_refused"),
        ("http://2852039166/latest/meta-data/", "address_refused"),
        # httpx refuses dotted quads with four-digit parts; other spellings parse as names
        # and are read the way inet_aton reads them.
        ("http://0251.0376.0251.0376/latest/meta-data/", "url_invalid"),
        ("http://0251.0376.43518/latest/meta-data/", "address_refused"),
        ("http://0177.1/a.png", "address_refused"),
        ("http://0xa9fea9fe/latest/meta-data/", "address_refused"),
        ("http://0xA9.0xFE.0xA9.0xFE/latest/meta-data/", "address_refused"),
        ("http://169.254.43518/latest/meta-data/", "address_refused"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "address_refused"),
        ("http://100.100.100.200/latest/meta-data/", "address_refused"),
        ("http://100.64.0.1/a.png", "address_refused"),
        ("http://10.0.0.1/a.png", "address_refused"),
        ("http://172.16.5.4/a.png", "address_refused"),
        ("http://192.168.1.1/a.png", "address_refused"),
        ("http://198.18.0.1/a.png", "address_refused"),
        ("http://0.0.0.0/a.png", "address_refused"),
        ("http://224.0.0.1/a.png", "address_refused"),
        ("http://255.255.255.255/a.png", "address_refused"),
        ("http://240.0.0.1/a.png", "address_refused"),
        ("http://[::1]/a.png", "address_refused"),
        ("http://[::]/a.png", "address_refused"),
        ("http://[fe80::1]/a.png", "address_refused"),
        ("http://[fc00::1]/a.png", "address_refused"),
        ("http://[ff02::1]/a.png", "address_refused"),
        ("http://[::ffff:127.0.0.1]/a.png", "address_refused"),
        ("http://[::ffff:169.254.169.254]/a.png", "address_refused"),
        ("http://[::ffff:a9fe:a9fe]/a.png", "address_refused"),
        ("http://[64:ff9b::a9fe:a9fe]/a.png", "address_refused"),
        ("http://[2002:7f00:1::1]/a.png", "address_refused"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/a.png", "address_refused"),
    ],
)
async def test_refused_before_any_request(harness: Harness, url: str, reason: str) -> None:
    error = await refused(harness, url)
    assert error.reason == reason
    assert error.stage == "fetch"
    assert harness.requests == []


async def test_name_resolving_to_private_address_is_refused() -> None:
    resolver = FakeResolver({"internal.example.com": ["10.1.2.3"]})
    harness = Harness(resolver=resolver)
    error = await refused(harness, "https://internal.example.com/a.png")
    assert error.reason == "address_refused"
    assert resolver.calls == ["internal.example.com"]
    assert harness.requests == []


@pytest.mark.parametrize(
    "answers",
    [
        [PUBLIC_IP, "127.0.0.1"],  # any bad address refuses the host
        ["::ffff:10.0.0.1"],
        ["169.254.169.254"],
        ["fd00:ec2::254"],
        ["100.100.100.200"],
        ["100.127.255.254"],
    ],
)
async def test_every_resolved_address_is_checked(answers: list[str]) -> None:
    harness = Harness(resolver=FakeResolver({"cdn.example.com": answers}))
    error = await refused(harness, "http://cdn.example.com/a.png")
    assert error.reason == "address_refused"
    assert harness.requests == []


async def test_host_allowlist_restricts_hosts_and_admits_subdomains() -> None:
    harness = Harness(host_allowlist=("images.example.com",))
    error = await refused(harness, "http://evil.example.net/a.png")
    assert error.reason == "host_refused"
    error = await refused(harness, "http://notimages.example.com/a.png")
    assert error.reason == "host_refused"
    assert harness.requests == []
    fetched = await harness.fetcher.fetch("http://eu.Images.Example.com/a.png")
    assert fetched.format == "PNG"


async def test_unknown_host_fails_without_retry() -> None:
    gone = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    resolver = FakeResolver({"gone.example.com": gone})  # type: ignore[dict-item]
    harness = Harness(resolver=resolver)
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("http://gone.example.com/a.png")
    assert caught.value.reason == "fetch_failed"
    assert resolver.calls == ["gone.example.com"]
    assert harness.requests == []


# -- allowed_hosts and pinning -----------------------------------------------------------


async def test_allowed_hosts_skip_the_address_check_for_that_port_only() -> None:
    harness = Harness(allowed_hosts=("127.0.0.1:8080", "MinIO"))
    harness.resolver.table["minio"] = ["172.18.0.5"]
    fetched = await harness.fetcher.fetch("http://127.0.0.1:8080/a.png")
    assert fetched.format == "PNG"
    fetched = await harness.fetcher.fetch("http://minio:9000/bucket/a.png")
    assert fetched.status == 200
    error = await refused(harness, "http://127.0.0.1:8081/a.png")
    assert error.reason == "address_refused"
    assert len(harness.requests) == 2


async def test_allowed_hosts_from_environment_string() -> None:
    settings = FetchSettings.model_validate({"allowed_hosts": "LocalHost:8080, [::1]:9000"})
    assert settings.allowed_hosts == ("localhost:8080", "[::1]:9000")
    resolver = FakeResolver({"localhost": ["127.0.0.1", "::1"]})
    fetcher = ImageFetcher(
        settings,
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=PNG)),
        resolver=resolver,
    )
    async with fetcher:
        assert (await fetcher.fetch("http://localhost:8080/a.png")).format == "PNG"
        assert (await fetcher.fetch("http://[::1]:9000/a.png")).format == "PNG"


async def test_request_is_pinned_to_the_checked_address(harness: Harness) -> None:
    fetched = await harness.fetcher.fetch("https://Images.Example.com/p/a.png?w=1")
    (request,) = harness.requests
    assert request.url.host == "images.example.com"
    assert request.headers["host"] == "images.example.com"
    assert request.headers["accept-encoding"] == "identity"
    assert request.extensions[PIN_EXTENSION] == PinnedAddresses(
        host="images.example.com", addresses=(PUBLIC_IP,)
    )
    assert harness.resolver.calls == ["images.example.com"]
    assert fetched.final_url == "https://images.example.com/p/a.png?w=1"


async def test_numeric_public_host_is_sent_as_dotted_quad(harness: Harness) -> None:
    await harness.fetcher.fetch("http://1572395042/a.png")  # 93.184.216.34
    (request,) = harness.requests
    assert request.url.host == PUBLIC_IP
    assert request.extensions[PIN_EXTENSION].addresses == (PUBLIC_IP,)
    assert harness.resolver.calls == []


class RecordingBackend(httpcore.AsyncMockBackend):
    def __init__(self, buffer: list[bytes]) -> None:
        super().__init__(buffer)
        self.hosts: list[str] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.hosts.append(host)
        return await super().connect_tcp(host, port, *args, **kwargs)


async def test_pinned_transport_connects_to_the_pinned_address_only() -> None:
    response = [
        b"HTTP/1.1 200 OK\r\n",
        f"Content-Length: {len(PNG)}\r\n\r\n".encode(),
        PNG,
    ]
    backend = RecordingBackend(response)
    transport = PinnedTransport(limits=httpx.Limits(), network_backend=backend)
    fetcher = ImageFetcher(
        FetchSettings(),
        transport=transport,
        resolver=FakeResolver({"images.example.com": [PUBLIC_IP]}),
    )
    async with fetcher:
        fetched = await fetcher.fetch("http://images.example.com/a.png")
    assert fetched.data == PNG
    assert backend.hosts == [PUBLIC_IP]


async def test_pinned_transport_refuses_requests_without_a_pin() -> None:
    backend = RecordingBackend([])
    async with PinnedTransport(limits=httpx.Limits(), network_backend=backend) as transport:
        request = httpx.Request("GET", "http://images.example.com/a.png")
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(request)
        other = PinnedAddresses(host="other.example.com", addresses=(PUBLIC_IP,))
        request = httpx.Request(
            "GET", "http://images.example.com/a.png", extensions={PIN_EXTENSION: other}
        )
        with pytest.raises(httpx.ConnectError):
            await transport.handle_async_request(request)
    assert backend.hosts == []


# -- redirects ---------------------------------------------------------------------------


def redirecting(locations: dict[str, str]) -> Handler:
    """Redirect each listed path to its Location; serve the PNG elsewhere."""

    def handler(request: httpx.Request) -> httpx.Response:
        location = locations.get(request.url.path)
        if location is not None:
            return httpx.Response(302, headers={"location": location})
        return httpx.Response(200, content=PNG)

    return handler


async def test_redirects_are_followed_and_counted() -> None:
    harness = Harness(redirecting({"/a": "/b", "/b": "https://cdn.example.com/c"}))
    fetched = await harness.fetcher.fetch("http://images.example.com/a")
    assert fetched.redirects == 2
    assert fetched.final_url == "https://cdn.example.com/c"
    assert [str(r.url) for r in harness.requests] == [
        "http://images.example.com/a",
        "http://images.example.com/b",
        "https://cdn.example.com/c",
    ]
    assert harness.resolver.calls == ["images.example.com"] * 2 + ["cdn.example.com"]


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "address_refused"),
        ("http://0xa9fea9fe/", "address_refused"),
        ("http://[::ffff:127.0.0.1]:8080/", "address_refused"),
        ("//10.0.0.1/a.png", "address_refused"),
        ("http://internal.example.com/a.png", "address_refused"),
        ("s3://private-bucket/secret.png", "scheme_refused"),
        ("file:///etc/passwd", "scheme_refused"),
        ("gopher://example.com/", "scheme_refused"),
        ("http://user:pw@example.com/", "url_invalid"),
    ],
)
async def test_redirect_to_refused_target_is_refused_at_the_hop(location: str, reason: str) -> None:
    resolver = FakeResolver({"internal.example.com": ["192.168.0.10"]})
    harness = Harness(redirecting({"/a.png": location}), resolver=resolver)
    error = await refused(harness, "http://images.example.com/a.png")
    assert error.reason == reason
    assert len(harness.requests) == 1


async def test_too_many_redirects() -> None:
    harness = Harness(redirecting({"/0": "/1", "/1": "/2", "/2": "/3", "/3": "/4"}))
    error = await refused(harness, "http://images.example.com/0")
    assert error.reason == "too_many_redirects"
    assert len(harness.requests) == 4  # max_redirects=3 followed, the 4th refused


# -- size cap ----------------------------------------------------------------------------


class ChunkStream(httpx.AsyncByteStream):
    """A streamed body; `endless` repeats the last chunk forever."""

    def __init__(self, chunks: list[bytes], *, endless: bool = False) -> None:
        self.chunks = chunks
        self.endless = endless
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.sent += 1
            yield chunk
        while self.endless:
            self.sent += 1
            yield self.chunks[-1]


async def test_content_length_over_cap_is_refused_before_reading() -> None:
    stream = ChunkStream([PNG])
    harness = Harness(
        lambda r: httpx.Response(200, headers={"content-length": "5000"}, stream=stream),
        max_bytes=4096,
    )
    error = await refused(harness, "http://images.example.com/a.png")
    assert error.reason == "too_large"
    assert stream.sent == 0


async def test_body_over_cap_without_content_length_is_cut() -> None:
    stream = ChunkStream([PNG[:16], b"\0" * 3000, b"\0" * 3000])
    harness = Harness(lambda r: httpx.Response(200, stream=stream), max_bytes=4096)
    error = await refused(harness, "http://images.example.com/a.png")
    assert error.reason == "too_large"
    assert stream.sent == 3


async def test_endless_body_is_cut_at_the_cap() -> None:
    stream = ChunkStream([PNG[:16], b"\0" * 1024], endless=True)
    harness = Harness(lambda r: httpx.Response(200, stream=stream), max_bytes=64 * 1024)
    error = await refused(harness, "http://images.example.com/a.png")
    assert error.reason == "too_large"
    assert stream.sent == 1 + 64


async def test_body_at_the_cap_is_accepted() -> None:
    body = PNG + b"\0" * (4096 - len(PNG))
    harness = Harness(lambda r: httpx.Response(200, stream=ChunkStream([body])), max_bytes=4096)
    fetched = await harness.fetcher.fetch("http://images.example.com/a.png")
    assert fetched.data == body


async def test_compressed_body_is_not_inflated() -> None:
    harness = Harness(
        lambda r: httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"\x1f\x8b")
    )
    error = await refused(harness, "http://images.example.com/a.png")
    assert error.reason == "not_an_image"


# -- content sniffing --------------------------------------------------------------------


@pytest.mark.parametrize(("body", "fmt"), [(PNG, "PNG"), (JPEG, "JPEG"), (WEBP, "WEBP")])
async def test_format_comes_from_magic_bytes_not_content_type(body: bytes, fmt: str) -> None:
    harness = Harness(
        lambda r: httpx.Response(200, headers={"content-type": "text/html"}, content=body)
    )
    fetched = await harness.fetcher.fetch("http://images.example.com/x")
    assert (fetched.format, fetched.data, fetched.attempts) == (fmt, body, 1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<!doctype html><html><body>hello</body></html>", "not_an_image"),
        (b"", "not_an_image"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not_an_image"),
        (GIF, "format_refused"),
        (b"II*\x00" + b"\0" * 64, "format_refused"),
        (b"BM" + b"\0" * 64, "format_refused"),
        (b"8BPS\x00\x01" + b"\0" * 64, "format_refused"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "format_refused"),
    ],
)
async def test_bodies_that_are_not_accepted_images(body: bytes, reason: str) -> None:
    harness = Harness(
        lambda r: httpx.Response(200, headers={"content-type": "image/jpeg"}, content=body)
    )
    error = await refused(harness, "http://images.example.com/a.jpg")
    assert error.reason == reason


async def test_html_is_refused_after_the_first_kilobyte() -> None:
    stream = ChunkStream([b"<html>" + b" " * 2000], endless=True)
    harness = Harness(lambda r: httpx.Response(200, stream=stream))
    error = await refused(harness, "http://images.example.com/a.jpg")
    assert error.reason == "not_an_image"
    assert stream.sent == 1


# -- retries -----------------------------------------------------------------------------


def sequence(*responses: httpx.Response | Exception) -> Handler:
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    return handler


async def test_503_is_retried_with_exponential_backoff() -> None:
    harness = Harness(
        sequence(httpx.Response(503), httpx.Response(503), httpx.Response(200, content=PNG))
    )
    fetched = await harness.fetcher.fetch("http://images.example.com/a.png")
    assert fetched.attempts == 3
    assert len(harness.requests) == 3
    assert harness.delays == pytest.approx([0.1, 0.2])  # jitter 1.0: the full cap


async def test_persistent_503_fails_after_max_attempts() -> None:
    harness = Harness(sequence(httpx.Response(503)))
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("http://images.example.com/a.png")
    assert caught.value.reason == "http_status"
    assert caught.value.retryable is True
    assert len(harness.requests) == 3


async def test_404_fails_at_once() -> None:
    harness = Harness(sequence(httpx.Response(404)))
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("http://images.example.com/a.png")
    assert caught.value.reason == "http_status"
    assert caught.value.retryable is False
    assert len(harness.requests) == 1
    assert harness.delays == []


async def test_429_honours_retry_after_up_to_backoff_max() -> None:
    harness = Harness(
        sequence(
            httpx.Response(429, headers={"retry-after": "1"}),
            httpx.Response(429, headers={"retry-after": "120"}),
            httpx.Response(200, content=PNG),
        )
    )
    fetched = await harness.fetcher.fetch("http://images.example.com/a.png")
    assert fetched.attempts == 3
    assert harness.delays == [1.0, 2.0]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (httpx.ReadTimeout("slow"), "fetch_timeout"),
        (httpx.ConnectTimeout("slow"), "fetch_timeout"),
        (httpx.ConnectError("refused"), "fetch_failed"),
        (httpx.RemoteProtocolError("closed"), "fetch_failed"),
    ],
)
async def test_transport_errors_are_retried(error: Exception, reason: str) -> None:
    harness = Harness(sequence(error))
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("http://images.example.com/a.png")
    assert caught.value.reason == reason
    assert len(harness.requests) == 3

    harness = Harness(sequence(error, httpx.Response(200, content=PNG)))
    fetched = await harness.fetcher.fetch("http://images.example.com/a.png")
    assert fetched.attempts == 2


async def test_no_retry_when_the_backoff_would_pass_the_deadline() -> None:
    harness = Harness(sequence(httpx.Response(503)), backoff_base_s=5.0, total_timeout_s=1.0)
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("http://images.example.com/a.png")
    assert caught.value.reason == "http_status"
    assert len(harness.requests) == 1


async def test_total_deadline() -> None:
    never = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(200, content=PNG)

    fetcher = ImageFetcher(
        FetchSettings(total_timeout_s=0.05),
        transport=httpx.MockTransport(hang),
        resolver=FakeResolver(),
    )
    async with fetcher:
        with pytest.raises(FetchFailedError) as caught:
            await fetcher.fetch("http://images.example.com/a.png")
    assert caught.value.reason == "fetch_timeout"


@pytest.mark.parametrize("status", [204, 206, 304, 401, 403, 410])
async def test_other_statuses_fail(status: int) -> None:
    harness = Harness(sequence(httpx.Response(status)))
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("http://images.example.com/a.png")
    assert caught.value.reason == "http_status"
    assert len(harness.requests) == 1


# -- S3 ----------------------------------------------------------------------------------


class FakeS3:
    def __init__(self, *outcomes: bytes | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, str]] = []

    def get_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]:  # noqa: N803
        self.calls.append((Bucket, Key))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return {
            "Body": StreamingBody(io.BytesIO(outcome), len(outcome)),
            "ContentLength": len(outcome),
        }


def s3_error(code: str, status: int) -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": code},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


async def test_s3_object_is_fetched() -> None:
    s3 = FakeS3(JPEG)
    harness = Harness(s3=s3)
    fetched = await harness.fetcher.fetch("s3://listing-images/2024/01/my%20photo.jpg")
    assert (fetched.format, fetched.data, fetched.status) == ("JPEG", JPEG, 200)
    assert s3.calls == [("listing-images", "2024/01/my photo.jpg")]
    assert harness.requests == []
    assert harness.resolver.calls == []


async def test_s3_missing_key_fails_at_once_and_throttling_is_retried() -> None:
    s3 = FakeS3(s3_error("NoSuchKey", 404))
    harness = Harness(s3=s3)
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch("s3://listing-images/a.jpg")
    assert (caught.value.reason, len(s3.calls)) == ("http_status", 1)

    s3 = FakeS3(s3_error("SlowDown", 503), ReadTimeoutError(endpoint_url="x"), PNG)
    harness = Harness(s3=s3)
    fetched = await harness.fetcher.fetch("s3://listing-images/a.png")
    assert (fetched.attempts, len(harness.delays)) == (3, 2)


async def test_s3_size_cap_and_sniffing() -> None:
    harness = Harness(s3=FakeS3(PNG + b"\0" * 5000), max_bytes=4096)
    error = await refused(harness, "s3://listing-images/a.png")
    assert error.reason == "too_large"
    harness = Harness(s3=FakeS3(b"%PDF-1.7"))
    error = await refused(harness, "s3://listing-images/a.pdf")
    assert error.reason == "not_an_image"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("s3://listing-images/", "url_invalid"),
        ("s3://Bad_Bucket/a.png", "url_invalid"),
        ("s3://listing-images/a.png?versionId=1", "url_invalid"),
        ("s3://other-bucket/a.png", "host_refused"),
    ],
)
async def test_s3_urls_are_checked(url: str, reason: str) -> None:
    s3 = FakeS3(PNG)
    harness = Harness(s3=s3, host_allowlist=("listing-images",))
    error = await refused(harness, url)
    assert error.reason == reason
    assert s3.calls == []


async def test_s3_scheme_can_be_disabled() -> None:
    harness = Harness(s3=FakeS3(PNG), allowed_schemes=("https",))
    error = await refused(harness, "s3://listing-images/a.png")
    assert error.reason == "scheme_refused"
    error = await refused(harness, "http://images.example.com/a.png")
    assert error.reason == "scheme_refused"


# -- the address policy itself -----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_IP,
        "8.8.8.8",
        "2606:2800:220:1:248:1893:25c8:1946",
        "::ffff:93.184.216.34",
        "64:ff9b::5db8:d822",  # NAT64 of a public address (IPv6-only clusters with DNS64)
        "2002:5db8:d822::1",  # 6to4 of a public address
    ],
)
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(ip_address(address)) is None


@pytest.mark.parametrize(
    ("address", "label"),
    [
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("100.100.100.200", "cloud metadata"),
        ("100.64.0.1", "shared CGNAT"),
        ("::ffff:192.168.0.1", "private"),
        ("64:ff9b::7f00:1", "loopback"),
        ("192.0.2.1", "documentation"),
    ],
)
def test_refusal_labels(address: str, label: str) -> None:
    assert address_refusal(ip_address(address)) == label
