"""Unit tests of the fetch step against an aiohttp.web origin on 127.0.0.1.

Test host names resolve (through a fake resolver) to the origin's loopback address and are
in `allowed_hosts` for its port; every other name and address must pass the real address
policy. aiohttp trace hooks record each connection the fetcher starts, so refusals can
prove that nothing was connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.response import StreamingBody
from PIL import Image

from category_suggester.errors import FetchFailedError, FetchRefusedError
from category_suggester.fetch import CheckedResolver, ImageFetcher, address_refusal
from category_suggester.settings import FetchSettings

PUBLIC_IP = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"
LOOPBACK = "127.0.0.1"
# The names the origin serves: they resolve to loopback and are allowed on its port.
SERVED = ("images.example.com", "eu.images.example.com", "cdn.example.com")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def image_bytes(fmt: str, size: tuple[int, int] = (8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return buffer.getvalue()


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG")
WEBP = image_bytes("WEBP")
GIF = image_bytes("GIF")


@dataclass(frozen=True)
class Seen:
    """One request as the origin received it."""

    host: str
    path_qs: str
    headers: Mapping[str, str]


async def serve_png(request: web.Request) -> web.StreamResponse:
    return web.Response(body=PNG)


class Origin:
    """An aiohttp.web server on 127.0.0.1 (and ::1, same port, where it can) that answers
    with the current `handler` and records every request."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.handler: Handler = serve_png
        self.release = asyncio.Event()  # ends every hanging handler
        self.port = 0
        self.v6 = False
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        # Handlers that wait for the client are cancelled when it hangs up.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self.port = server.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError):
            await web.TCPSite(self._runner, "::1", self.port).start()
            self.v6 = True

    async def stop(self) -> None:
        self.release.set()
        await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.host, request.path_qs, dict(request.headers)))
        return await self.handler(request)

    def url(self, path: str = "/a.png", host: str = "images.example.com") -> str:
        return f"http://{host}:{self.port}{path}"


class FakeResolver:
    """Answers from a table (a list of answers is used one per call, the last one kept);
    unknown names resolve to loopback, which only `allowed_hosts` admits."""

    def __init__(self, table: Mapping[str, Any] | None = None) -> None:
        self.table: dict[str, Any] = dict(table or {})
        self.calls: list[str] = []

    async def __call__(self, host: str) -> Sequence[str]:
        self.calls.append(host)
        answer = self.table.get(host, [LOOPBACK])
        if isinstance(answer, BaseException):
            raise answer
        if answer and isinstance(answer[0], list):
            return answer.pop(0) if len(answer) > 1 else answer[0]
        return list(answer)


class Harness:
    """An ImageFetcher wired to the origin, recording its backoff delays and connections."""

    def __init__(
        self,
        origin: Origin,
        handler: Handler | None = None,
        *,
        resolver: FakeResolver | None = None,
        s3: Any = None,
        served: Sequence[str] = SERVED,
        address_ttl_s: float = 10.0,
        **settings: Any,
    ) -> None:
        self.origin = origin
        if handler is not None:
            origin.handler = handler
        self.delays: list[float] = []
        self.connecting: list[str] = []  # connection attempts started
        self.connected: list[str] = []  # connections made
        self.resolver = resolver or FakeResolver()
        defaults: dict[str, Any] = {"backoff_base_s": 0.1, "backoff_max_s": 2.0}
        defaults.update(settings)
        defaults["allowed_hosts"] = tuple(f"{name}:{origin.port}" for name in served) + tuple(
            defaults.get("allowed_hosts", ())
        )
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_start.append(self._connecting)
        trace.on_connection_create_end.append(self._connected)
        self.fetcher = ImageFetcher(
            FetchSettings(**defaults),
            resolver=self.resolver,
            s3_client_factory=(lambda: s3) if s3 is not None else None,
            sleep=self._sleep,
            jitter=lambda: 1.0,
            trace_configs=[trace],
            address_ttl_s=address_ttl_s,
        )

    @property
    def requests(self) -> list[Seen]:
        return self.origin.requests

    async def fetch(self, path: str = "/a.png", host: str = "images.example.com") -> Any:
        return await self.fetcher.fetch(self.origin.url(path, host))

    async def _connecting(self, session: Any, context: SimpleNamespace, params: Any) -> None:
        self.connecting.append("start")

    async def _connected(self, session: Any, context: SimpleNamespace, params: Any) -> None:
        self.connected.append("made")

    async def _sleep(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    await server.start()
    yield server
    await server.stop()


Make = Callable[..., Harness]


@pytest.fixture
async def make(origin: Origin) -> AsyncIterator[Make]:
    made: list[Harness] = []

    def build(handler: Handler | None = None, **kwargs: Any) -> Harness:
        harness = Harness(origin, handler, **kwargs)
        made.append(harness)
        return harness

    yield build
    for harness in made:
        await harness.fetcher.aclose()


@pytest.fixture
def harness(make: Make) -> Harness:
    return make()


async def refused(harness: Harness, url: str) -> FetchRefusedError:
    with pytest.raises(FetchRefusedError) as caught:
        await harness.fetcher.fetch(url)
    return caught.value


async def failed(harness: Harness, url: str) -> FetchFailedError:
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.fetch(url)
    return caught.value


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = int(probe.getsockname()[1])
    yield port


# -- refusals before any connection -------------------------------------------------------


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
        # httpx's URL parser refuses dotted quads with four-digit parts; other spellings
        # parse as names and are read the way inet_aton reads them.
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
async def test_refused_before_any_connection(harness: Harness, url: str, reason: str) -> None:
    error = await refused(harness, url)
    assert error.reason == reason
    assert error.stage == "fetch"
    assert harness.connecting == []
    assert harness.requests == []


@pytest.mark.parametrize("host", [LOOPBACK, "localhost", "127.1", "[::1]", "[::ffff:7f00:1]"])
async def test_the_origin_itself_is_refused_unless_allowed(harness: Harness, host: str) -> None:
    """The origin listens on this very port: only the address policy keeps it out."""
    error = await refused(harness, harness.origin.url(host=host))
    assert error.reason == "address_refused"
    assert harness.connecting == []
    assert harness.requests == []


async def test_name_resolving_to_private_address_is_refused(make: Make) -> None:
    resolver = FakeResolver({"internal.example.com": ["10.1.2.3"]})
    harness = make(resolver=resolver)
    error = await refused(harness, "https://internal.example.com/a.png")
    assert error.reason == "address_refused"
    assert resolver.calls == ["internal.example.com"]
    assert harness.connecting == []


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
async def test_every_resolved_address_is_checked(make: Make, answers: list[str]) -> None:
    harness = make(resolver=FakeResolver({"cdn.example.com": answers}), served=())
    error = await refused(harness, harness.origin.url(host="cdn.example.com"))
    assert error.reason == "address_refused"
    assert harness.connecting == []
    assert harness.requests == []


async def test_host_allowlist_restricts_hosts_and_admits_subdomains(make: Make) -> None:
    harness = make(host_allowlist=("images.example.com",))
    error = await refused(harness, "http://evil.example.net/a.png")
    assert error.reason == "host_refused"
    error = await refused(harness, "http://notimages.example.com/a.png")
    assert error.reason == "host_refused"
    assert harness.resolver.calls == []
    # A subdomain passes the allowlist and goes on to the address check.
    harness.resolver.table["eu.images.example.com"] = ["10.0.0.7"]
    error = await refused(harness, "http://eu.Images.Example.com/a.png")
    assert error.reason == "address_refused"
    assert harness.resolver.calls == ["eu.images.example.com"]
    harness.resolver.table["eu.images.example.com"] = [LOOPBACK]
    fetched = await harness.fetch(host="eu.images.example.com")
    assert fetched.format == "PNG"


async def test_unknown_host_fails_without_retry(make: Make) -> None:
    gone = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    resolver = FakeResolver({"gone.example.com": gone})
    harness = make(resolver=resolver)
    error = await failed(harness, "http://gone.example.com/a.png")
    assert error.reason == "fetch_failed"
    assert resolver.calls == ["gone.example.com"]
    assert harness.connecting == []


async def test_resolver_fault_is_retried(make: Make) -> None:
    flaky = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    resolver = FakeResolver({"flaky.example.com": flaky})
    harness = make(resolver=resolver)
    error = await failed(harness, "http://flaky.example.com/a.png")
    assert (error.reason, error.attempts) == ("fetch_failed", 3)
    assert resolver.calls == ["flaky.example.com"] * 3


async def test_check_applies_the_url_policy_without_a_connection(make: Make) -> None:
    resolver = FakeResolver({"internal.example.com": ["10.1.2.3"], "cdn.example.com": [PUBLIC_IP]})
    harness = make(resolver=resolver, host_allowlist=("example.com",))
    cases = {
        "file:///etc/passwd": "scheme_refused",
        "http://evil.example.net/a.png": "host_refused",
        "http://internal.example.com/a.png": "address_refused",
        "http://169.254.169.254/latest": "host_refused",
        "http://user:pw@cdn.example.com/a.png": "url_invalid",
    }
    for url, reason in cases.items():
        with pytest.raises(FetchRefusedError) as caught:
            await harness.fetcher.check(url)
        assert caught.value.reason == reason, url
    await harness.fetcher.check("https://cdn.example.com/a.png")
    await harness.fetcher.check(harness.origin.url())  # allowed_hosts admits the origin
    assert resolver.calls == ["internal.example.com", "cdn.example.com", "images.example.com"]
    assert harness.connecting == []
    assert harness.requests == []


async def test_check_of_an_unknown_host_fails(make: Make) -> None:
    gone = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    harness = make(resolver=FakeResolver({"gone.example.com": gone}))
    with pytest.raises(FetchFailedError) as caught:
        await harness.fetcher.check("http://gone.example.com/a.png")
    assert caught.value.reason == "fetch_failed"


# -- allowed_hosts and pinning -----------------------------------------------------------


async def test_allowed_hosts_skip_the_address_check_for_that_port_only(
    make: Make, origin: Origin
) -> None:
    harness = make(allowed_hosts=(f"127.0.0.1:{origin.port}", "MinIO"), served=())
    fetched = await harness.fetcher.fetch(origin.url(host=LOOPBACK))
    assert fetched.format == "PNG"
    fetched = await harness.fetcher.fetch(origin.url("/bucket/a.png", host="minio"))
    assert fetched.status == 200
    with closed_port() as other:
        error = await refused(harness, f"http://127.0.0.1:{other}/a.png")
    assert error.reason == "address_refused"
    assert len(harness.requests) == 2
    assert harness.resolver.calls == ["minio"]


async def test_allowed_hosts_from_environment_string(origin: Origin) -> None:
    port = origin.port
    settings = FetchSettings.model_validate({"allowed_hosts": f"LocalHost:{port}, [::1]:{port}"})
    assert settings.allowed_hosts == (f"localhost:{port}", f"[::1]:{port}")
    resolver = FakeResolver({"localhost": ["127.0.0.1"]})
    async with ImageFetcher(settings, resolver=resolver) as fetcher:
        assert (await fetcher.fetch(origin.url(host="localhost"))).format == "PNG"
        if origin.v6:
            assert (await fetcher.fetch(origin.url(host="[::1]"))).format == "PNG"
        with pytest.raises(FetchRefusedError):
            await fetcher.fetch(f"http://localhost:{port + 1}/a.png")


async def test_request_goes_to_the_checked_address_with_the_host_name(harness: Harness) -> None:
    port = harness.origin.port
    fetched = await harness.fetcher.fetch(f"http://Images.Example.com:{port}/p/a.png?w=1")
    # images.example.com is not loopback in any real DNS: the connection went where the
    # resolver said, while Host names the URL's host.
    (request,) = harness.requests
    assert request.host == f"images.example.com:{port}"
    assert request.path_qs == "/p/a.png?w=1"
    assert request.headers["Accept-Encoding"] == "identity"
    assert "Cookie" not in request.headers
    assert harness.resolver.calls == ["images.example.com"]
    assert fetched.final_url == f"http://images.example.com:{port}/p/a.png?w=1"


async def test_numeric_host_is_sent_as_dotted_quad(make: Make, origin: Origin) -> None:
    harness = make(allowed_hosts=(f"127.0.0.1:{origin.port}",))
    await harness.fetcher.fetch(origin.url(host="2130706433"))
    (request,) = harness.requests
    assert request.host == f"127.0.0.1:{origin.port}"
    assert harness.resolver.calls == []


async def test_connections_are_reused(harness: Harness) -> None:
    for _ in range(3):
        await harness.fetch()
    await harness.fetch(host="cdn.example.com")
    assert len(harness.requests) == 4
    assert len(harness.connected) == 2  # one per host
    assert harness.resolver.calls == ["images.example.com", "cdn.example.com"]


async def test_rebinding_answer_at_connect_time_is_refused(make: Make) -> None:
    """The checked answer expired between the request's check and the connector's lookup
    and the name now points at loopback: the connector gets a refusal, not an address."""
    resolver = FakeResolver({"rebind.example.com": [[PUBLIC_IP], [LOOPBACK]]})
    harness = make(resolver=resolver, address_ttl_s=0.0)
    error = await refused(harness, harness.origin.url(host="rebind.example.com"))
    assert error.reason == "address_refused"
    assert resolver.calls == ["rebind.example.com"] * 2
    assert harness.connected == []
    assert harness.requests == []


async def test_checked_resolver_returns_only_checked_addresses() -> None:
    resolver = FakeResolver(
        {
            "images.example.com": [PUBLIC_IP, PUBLIC_V6],
            "internal.example.com": [PUBLIC_IP, "10.0.0.1"],
            "minio": ["172.18.0.5"],
        }
    )
    checked = CheckedResolver(resolver, frozenset({("minio", 9000)}))
    hosts = await checked.resolve("Images.Example.com.", 443)
    assert [(h["host"], h["port"], h["family"]) for h in hosts] == [
        (PUBLIC_IP, 443, socket.AF_INET),
        (PUBLIC_V6, 443, socket.AF_INET6),
    ]
    assert {h["hostname"] for h in hosts} == {"Images.Example.com."}
    await checked.resolve("images.example.com", 443)
    assert resolver.calls == ["images.example.com"]  # the checked answer is reused
    with pytest.raises(FetchRefusedError) as caught:
        await checked.resolve("internal.example.com", 443)
    assert caught.value.reason == "address_refused"
    with pytest.raises(FetchRefusedError):
        await checked.resolve("127.0.0.1", 80)
    assert [h["host"] for h in await checked.resolve("minio", 9000)] == ["172.18.0.5"]
    with pytest.raises(FetchRefusedError):
        await checked.resolve("minio", 9001)
    await checked.close()


async def test_refused_answers_are_not_kept() -> None:
    resolver = FakeResolver({"cdn.example.com": [["10.0.0.1"], [PUBLIC_IP]]})
    checked = CheckedResolver(resolver)
    with pytest.raises(FetchRefusedError):
        await checked.addresses("cdn.example.com", 443)
    assert await checked.addresses("cdn.example.com", 443) == (PUBLIC_IP,)
    assert resolver.calls == ["cdn.example.com"] * 2


# -- redirects ---------------------------------------------------------------------------


def redirecting(locations: Mapping[str, str]) -> Handler:
    """Redirect each listed path to its Location; serve the PNG elsewhere."""

    async def handler(request: web.Request) -> web.StreamResponse:
        location = locations.get(request.path)
        if location is not None:
            return web.Response(status=302, headers={"Location": location})
        return web.Response(body=PNG)

    return handler


async def test_redirects_are_followed_and_counted(make: Make, origin: Origin) -> None:
    cdn = origin.url("/c", host="cdn.example.com")
    harness = make(redirecting({"/a": "/b", "/b": cdn}))
    fetched = await harness.fetch("/a")
    assert fetched.redirects == 2
    assert fetched.final_url == cdn
    port = origin.port
    assert [(r.host, r.path_qs) for r in harness.requests] == [
        (f"images.example.com:{port}", "/a"),
        (f"images.example.com:{port}", "/b"),
        (f"cdn.example.com:{port}", "/c"),
    ]
    assert harness.resolver.calls == ["images.example.com", "cdn.example.com"]


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "address_refused"),
        ("http://0xa9fea9fe/", "address_refused"),
        ("http://[::ffff:127.0.0.1]:8080/", "address_refused"),
        ("//10.0.0.1/a.png", "address_refused"),
        ("http://internal.example.com/a.png", "address_refused"),
        ("http://127.0.0.1:{port}/a.png", "address_refused"),
        ("http://localhost:{port}/a.png", "address_refused"),
        ("s3://private-bucket/secret.png", "scheme_refused"),
        ("file:///etc/passwd", "scheme_refused"),
        ("gopher://example.com/", "scheme_refused"),
        ("http://user:pw@example.com/", "url_invalid"),
        ("http://[::1", "url_invalid"),
    ],
)
async def test_redirect_to_refused_target_is_refused_at_the_hop(
    make: Make, origin: Origin, location: str, reason: str
) -> None:
    resolver = FakeResolver({"internal.example.com": ["192.168.0.10"]})
    location = location.replace("{port}", str(origin.port))
    harness = make(redirecting({"/a.png": location}), resolver=resolver)
    error = await refused(harness, origin.url())
    assert error.reason == reason
    assert len(harness.requests) == 1
    assert len(harness.connecting) == 1


async def test_redirect_without_location_fails(make: Make) -> None:
    async def no_location(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302)

    harness = make(no_location)
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("http_status", 1)
    assert len(harness.requests) == 1


async def test_too_many_redirects(make: Make) -> None:
    harness = make(redirecting({"/0": "/1", "/1": "/2", "/2": "/3", "/3": "/4"}))
    error = await refused(harness, harness.origin.url("/0"))
    assert error.reason == "too_many_redirects"
    assert len(harness.requests) == 4  # max_redirects=3 followed, the 4th refused


# -- size cap ----------------------------------------------------------------------------


def streaming(
    first: Sequence[bytes],
    *,
    length: int | None = None,
    endless: bytes | None = None,
    hung_up: asyncio.Event | None = None,
) -> Handler:
    """Send `first`, then `endless` over and over, then hang until the client hangs up.

    `length` sets Content-Length (chunked without it). `hung_up` is set once the client
    has closed the connection.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        if length is not None:
            response.content_length = length
        else:
            response.enable_chunked_encoding()
        try:
            await response.prepare(request)
            for chunk in first:
                await response.write(chunk)
            while endless is not None:
                await response.write(endless)
            await asyncio.Event().wait()  # until cancelled by the client hanging up
        except (ConnectionError, asyncio.CancelledError):
            if hung_up is not None:
                hung_up.set()
            raise
        return response

    return handler


async def test_content_length_over_cap_is_refused_before_reading(make: Make) -> None:
    # The body never comes: waiting for it would end in fetch_timeout instead.
    harness = make(streaming([PNG[:16]], length=5000), max_bytes=4096)
    error = await refused(harness, harness.origin.url())
    assert error.reason == "too_large"


async def test_body_over_cap_without_content_length_is_cut(make: Make) -> None:
    hung_up = asyncio.Event()
    handler = streaming([PNG[:16], b"\0" * 3000, b"\0" * 3000], hung_up=hung_up)
    harness = make(handler, max_bytes=4096)
    error = await refused(harness, harness.origin.url())
    assert error.reason == "too_large"
    await asyncio.wait_for(hung_up.wait(), 5)  # the connection was closed, not kept


async def test_endless_body_is_cut_at_the_cap(make: Make) -> None:
    hung_up = asyncio.Event()
    handler = streaming([PNG[:16]], endless=b"\0" * 1024, hung_up=hung_up)
    harness = make(handler, max_bytes=64 * 1024)
    error = await refused(harness, harness.origin.url())
    assert error.reason == "too_large"
    await asyncio.wait_for(hung_up.wait(), 5)


async def test_body_at_the_cap_is_accepted(make: Make) -> None:
    body = PNG + b"\0" * (4096 - len(PNG))
    harness = make(chunked([body[:100], body[100:]]), max_bytes=4096)
    fetched = await harness.fetch()
    assert fetched.data == body


def chunked(chunks: Sequence[bytes]) -> Handler:
    """A complete chunked body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    return handler


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity, gzip"])
async def test_compressed_body_is_not_inflated(make: Make, encoding: str) -> None:
    async def compressed(request: web.Request) -> web.StreamResponse:
        return web.Response(body=gzip.compress(PNG), headers={"Content-Encoding": encoding})

    harness = make(compressed)
    error = await refused(harness, harness.origin.url())
    assert error.reason == "not_an_image"


async def test_identity_encoding_is_accepted(make: Make) -> None:
    async def identity(request: web.Request) -> web.StreamResponse:
        return web.Response(body=PNG, headers={"Content-Encoding": "identity"})

    harness = make(identity)
    assert (await harness.fetch()).data == PNG


# -- content sniffing --------------------------------------------------------------------


def serving(body: bytes, content_type: str, status: int = 200) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers={"Content-Type": content_type})

    return handler


@pytest.mark.parametrize(("body", "fmt"), [(PNG, "PNG"), (JPEG, "JPEG"), (WEBP, "WEBP")])
async def test_format_comes_from_magic_bytes_not_content_type(
    make: Make, body: bytes, fmt: str
) -> None:
    harness = make(serving(body, "text/html"))
    fetched = await harness.fetch("/x")
    assert (fetched.format, fetched.data, fetched.attempts, fetched.status) == (fmt, body, 1, 200)


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
async def test_bodies_that_are_not_accepted_images(make: Make, body: bytes, reason: str) -> None:
    harness = make(serving(body, "image/jpeg"))
    error = await refused(harness, harness.origin.url("/a.jpg"))
    assert error.reason == reason


async def test_html_is_refused_after_the_first_kilobyte(make: Make) -> None:
    # The rest of the page never comes: waiting for it would end in fetch_timeout.
    harness = make(streaming([b"<html>" + b" " * 2000]))
    error = await refused(harness, harness.origin.url("/a.jpg"))
    assert error.reason == "not_an_image"


# -- retries -----------------------------------------------------------------------------


def sequence(*handlers: Handler) -> Handler:
    """Each request gets the next handler; the last one answers the rest."""
    queue = list(handlers)

    async def handler(request: web.Request) -> web.StreamResponse:
        step = queue.pop(0) if len(queue) > 1 else queue[0]
        return await step(request)

    return handler


def status(code: int, headers: Mapping[str, str] | None = None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=code, body=b"status\n", headers=headers)

    return handler


async def hang(request: web.Request) -> web.StreamResponse:
    """No response at all, until the client gives up."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def garbage(request: web.Request) -> web.StreamResponse:
    """Not HTTP: the client must fail to parse it."""
    assert request.transport is not None
    request.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n")
    request.transport.close()
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_503_is_retried_with_exponential_backoff(make: Make) -> None:
    harness = make(sequence(status(503), status(503), serve_png))
    fetched = await harness.fetch()
    assert fetched.attempts == 3
    assert len(harness.requests) == 3
    assert harness.delays == pytest.approx([0.1, 0.2])  # jitter 1.0: the full cap


async def test_persistent_503_fails_after_max_attempts(make: Make) -> None:
    harness = make(status(503))
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("http_status", 3)
    assert not error.retryable  # its retries are spent: bad input, dead-lettered
    assert len(harness.requests) == 3


async def test_an_error_on_a_later_attempt_says_how_many_were_made(make: Make) -> None:
    harness = make(sequence(status(503), status(404)))
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("http_status", 2)

    harness = make(sequence(status(503), status(503), serving(b"<html>hi</html>", "image/png")))
    refusal = await refused(harness, harness.origin.url())
    assert (refusal.reason, refusal.attempts) == ("not_an_image", 3)


async def test_the_deadline_says_how_many_attempts_were_made(make: Make) -> None:
    harness = make(sequence(status(503), hang), total_timeout_s=0.2)
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("fetch_timeout", 2)
    assert len(harness.requests) == 2


async def test_404_fails_at_once(make: Make) -> None:
    harness = make(status(404))
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("http_status", 1)
    assert len(harness.requests) == 1
    assert harness.delays == []


async def test_429_honours_retry_after_up_to_backoff_max(make: Make) -> None:
    harness = make(
        sequence(
            status(429, {"Retry-After": "1"}),
            status(429, {"Retry-After": "120"}),
            serve_png,
        )
    )
    fetched = await harness.fetch()
    assert fetched.attempts == 3
    assert harness.delays == [1.0, 2.0]


@pytest.mark.parametrize(
    ("misbehaviour", "reason", "settings"),
    [
        (hang, "fetch_timeout", {"read_timeout_s": 0.05}),
        (garbage, "fetch_failed", {}),
    ],
)
async def test_origin_faults_are_retried(
    make: Make, misbehaviour: Handler, reason: str, settings: dict[str, Any]
) -> None:
    harness = make(misbehaviour, **settings)
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == (reason, 3)
    assert len(harness.requests) == 3

    harness = make(sequence(misbehaviour, serve_png), **settings)
    fetched = await harness.fetch()
    assert fetched.attempts == 2


async def test_body_shorter_than_its_length_is_retried(make: Make) -> None:
    async def short(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 100_000
        await response.prepare(request)
        await response.write(PNG)
        assert request.transport is not None
        request.transport.close()
        return response

    harness = make(short)
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("fetch_failed", 3)
    assert len(harness.requests) == 3


async def test_connection_refused_is_retried(make: Make) -> None:
    harness = make(allowed_hosts=("images.example.com",))
    with closed_port() as port:
        error = await failed(harness, f"http://images.example.com:{port}/a.png")
    assert (error.reason, error.attempts) == ("fetch_failed", 3)
    assert len(harness.connecting) == 3
    assert harness.connected == []


async def test_connect_timeout_is_retried(make: Make) -> None:
    """A listener that accepts and never speaks: the TLS handshake cannot finish."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        harness = make(allowed_hosts=(f"images.example.com:{port}",), connect_timeout_s=0.05)
        error = await failed(harness, f"https://images.example.com:{port}/a.png")
        assert (error.reason, error.attempts) == ("fetch_timeout", 3)
        assert len(harness.connecting) == 3
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_no_retry_when_the_backoff_would_pass_the_deadline(make: Make) -> None:
    harness = make(status(503), backoff_base_s=5.0, total_timeout_s=1.0)
    error = await failed(harness, harness.origin.url())
    assert error.reason == "http_status"
    assert len(harness.requests) == 1


async def test_total_deadline(make: Make) -> None:
    harness = make(hang, total_timeout_s=0.05)
    error = await failed(harness, harness.origin.url())
    assert (error.reason, error.attempts) == ("fetch_timeout", 1)


@pytest.mark.parametrize("code", [204, 206, 304, 401, 403, 410])
async def test_other_statuses_fail(make: Make, code: int) -> None:
    harness = make(status(code))
    error = await failed(harness, harness.origin.url())
    assert error.reason == "http_status"
    assert len(harness.requests) == 1


async def test_closed_fetcher_refuses_to_fetch(make: Make) -> None:
    harness = make()
    await harness.fetch()
    await harness.fetcher.aclose()
    with pytest.raises(RuntimeError):
        await harness.fetch()


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


async def test_s3_object_is_fetched(make: Make) -> None:
    s3 = FakeS3(JPEG)
    harness = make(s3=s3)
    fetched = await harness.fetcher.fetch("s3://listing-images/2024/01/my%20photo.jpg")
    assert (fetched.format, fetched.data, fetched.status) == ("JPEG", JPEG, 200)
    assert s3.calls == [("listing-images", "2024/01/my photo.jpg")]
    assert harness.requests == []
    assert harness.resolver.calls == []


async def test_s3_missing_key_fails_at_once_and_throttling_is_retried(make: Make) -> None:
    s3 = FakeS3(s3_error("NoSuchKey", 404))
    harness = make(s3=s3)
    error = await failed(harness, "s3://listing-images/a.jpg")
    assert (error.reason, len(s3.calls)) == ("http_status", 1)

    s3 = FakeS3(s3_error("SlowDown", 503), ReadTimeoutError(endpoint_url="x"), PNG)
    harness = make(s3=s3)
    fetched = await harness.fetcher.fetch("s3://listing-images/a.png")
    assert (fetched.attempts, len(harness.delays)) == (3, 2)


async def test_s3_size_cap_and_sniffing(make: Make) -> None:
    harness = make(s3=FakeS3(PNG + b"\0" * 5000), max_bytes=4096)
    error = await refused(harness, "s3://listing-images/a.png")
    assert error.reason == "too_large"
    harness = make(s3=FakeS3(b"%PDF-1.7"))
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
async def test_s3_urls_are_checked(make: Make, url: str, reason: str) -> None:
    s3 = FakeS3(PNG)
    harness = make(s3=s3, host_allowlist=("listing-images",))
    error = await refused(harness, url)
    assert error.reason == reason
    assert s3.calls == []


async def test_s3_scheme_can_be_disabled(make: Make) -> None:
    harness = make(s3=FakeS3(PNG), allowed_schemes=("https",))
    error = await refused(harness, "s3://listing-images/a.png")
    assert error.reason == "scheme_refused"
    error = await refused(harness, harness.origin.url())
    assert error.reason == "scheme_refused"


# -- the address policy itself -----------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        PUBLIC_IP,
        "8.8.8.8",
        PUBLIC_V6,
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
