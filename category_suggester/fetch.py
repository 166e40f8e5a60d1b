"""Fetch step: an untrusted image URL in, the image's bytes out.

`ImageFetcher.fetch(url)` takes the `image_url` of an event (http, https or s3) and returns
a `FetchedImage`: at most `max_bytes` bytes whose magic number says JPEG, PNG or WebP.

The URL is untrusted, so before any connection:

- the URL is parsed strictly (length cap, allowed schemes, no credentials, a valid host;
  IPv4 hosts written as numbers in any inet_aton form are normalised and checked);
- the host must match `host_allowlist` when that is set;
- every address the host resolves to is checked (`address_refusal`): loopback, private,
  link-local, CGNAT, multicast, reserved, documentation, benchmarking and cloud-metadata
  addresses are refused, also when wrapped in IPv4-mapped, NAT64 or 6to4 IPv6 addresses.
  Hosts in `allowed_hosts` skip this check (the local stack serves images on 127.0.0.1).

HTTP goes through one aiohttp session per fetcher whose connector resolves host names with
`CheckedResolver`: it resolves, checks every address and hands the connector only checked
addresses, so a rebinding DNS answer cannot steer a connection elsewhere; the fetcher asks
the same resolver before each request, so a refusal comes before any connection. Checked
answers are kept for `address_ttl_s`; aiohttp's own DNS cache is off. TLS verifies the
certificate against the URL's host name. Redirects are followed by hand, each hop checked
again; bodies are read raw (never decompressed) and capped while streaming.

Raises `FetchRefusedError` (nothing more is read) with `reason` `url_invalid`,
`scheme_refused`, `host_refused`, `address_refused`, `too_many_redirects`, `too_large`,
`not_an_image` or `format_refused`; or `FetchFailedError` with `reason` `http_status`,
`fetch_timeout` or `fetch_failed` once retries (timeouts, connection errors, 429, 5xx; with
full-jitter exponential backoff) are spent or cannot help (other 4xx, unknown host). Either
error's `attempts` says how many attempts the fetch made.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from types import TracebackType
from typing import Any, Protocol

import aiohttp
import httpx
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from category_suggester.errors import BadInputError, FetchFailedError, FetchRefusedError
from category_suggester.preprocess import ACCEPTED_FORMATS, sniff_format
from category_suggester.retry import Backoff
from category_suggester.settings import FetchSettings

__all__ = [
    "CheckedResolver",
    "FetchedImage",
    "ImageFetcher",
    "Resolver",
    "S3ClientFactory",
    "S3Reader",
    "address_refusal",
    "resolve_host",
]

IPAddress = IPv4Address | IPv6Address

# An async callable: host name -> its IP addresses (as text), as getaddrinfo would give.
Resolver = Callable[[str], Awaitable[Sequence[str]]]


class S3Reader(Protocol):
    """The part of a boto3 S3 client the fetcher uses."""

    def get_object(self, *, Bucket: str, Key: str) -> Mapping[str, Any]: ...  # noqa: N803


S3ClientFactory = Callable[[], S3Reader]

_HTTP_SCHEMES = frozenset({"http", "https"})
_SUPPORTED_SCHEMES = frozenset({"http", "https", "s3"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_REQUEST_HEADERS = {
    "Accept": "image/jpeg, image/png, image/webp",
    # Bodies are read raw and never decompressed; ask the origin not to compress.
    "Accept-Encoding": "identity",
    "User-Agent": "category-suggester",
}
# Enough bytes to tell every format `sniff_format` knows, SVG's XML prolog included.
_SNIFF_BYTES = 1024
_S3_CHUNK = 64 * 1024
# How long a checked DNS answer is reused (aiohttp's default DNS TTL), and how many hosts
# are remembered: enough for the origins of a stream, bounded against hostile variety.
_ADDRESS_TTL_S = 10.0
_ADDRESS_CACHE_SIZE = 1024
# Idle keep-alive connections are closed after this long.
_KEEPALIVE_S = 15.0

_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC_LABEL = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _networks(*pairs: tuple[str, str]) -> tuple[tuple[IPv4Network | IPv6Network, str], ...]:
    return tuple((ip_network(net), label) for net, label in pairs)


# Checked in order, so the most specific label comes first.
_REFUSED_V4 = _networks(
    ("169.254.169.254/32", "cloud metadata"),
    ("100.100.100.200/32", "cloud metadata"),
    ("192.0.0.192/32", "cloud metadata"),
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared CGNAT"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignment"),
    ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("240.0.0.0/4", "reserved"),
)
_REFUSED_V6 = _networks(
    ("fd00:ec2::254/128", "cloud metadata"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::/96", "IPv4-compatible (deprecated)"),
    ("64:ff9b:1::/48", "local-use NAT64"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001::/23", "IETF protocol assignment"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "segment routing"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)
_NAT64 = IPv6Network("64:ff9b::/96")


def address_refusal(address: IPAddress) -> str | None:
    """Why `address` must not be fetched from (a short label), or None if it is public.

    IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) addresses are judged by the
    IPv4 address they carry; a 6to4 address (2002::/16) is refused when its embedded IPv4
    address is. Anything Python does not consider globally routable is refused as well.
    """
    if isinstance(address, IPv6Address):
        if address.scope_id is not None:
            return "scoped"
        if address.ipv4_mapped is not None:
            return address_refusal(address.ipv4_mapped)
        if address in _NAT64:
            return address_refusal(IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None:
            inner = address_refusal(address.sixtofour)
            if inner is not None:
                return f"6to4 wrapping {inner}"
        table = _REFUSED_V6
    else:
        table = _REFUSED_V4
    for network, label in table:
        if address in network:
            return label
    if (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or not address.is_global
    ):
        return "not globally routable"
    return None


async def resolve_host(host: str) -> list[str]:
    """The default `Resolver`: the event loop's getaddrinfo, addresses in its order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            text = str(sockaddr[0])
            if text not in addresses:
                addresses.append(text)
    return addresses


@dataclass(frozen=True, slots=True)
class FetchedImage:
    """The bytes of one image and how they were obtained."""

    data: bytes
    format: str  # one of preprocess.ACCEPTED_FORMATS: "JPEG", "PNG", "WEBP"
    final_url: str  # after redirects
    status: int  # HTTP status of the final response (200; 200 for S3 too)
    attempts: int  # 1 unless retried
    redirects: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    scheme: str
    host: str  # lower case, no trailing dot, canonical text for IP literals
    port: int | None  # effective port (None for s3)
    address: IPAddress | None  # set when the host is an IP literal


@dataclass(slots=True)
class _Attempts:
    """How many attempts one fetch has started; read when its deadline stops it."""

    made: int = 0


class _RetryableError(Exception):
    """One attempt failed in a way another attempt may not."""

    def __init__(self, message: str, *, reason: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class _Body:
    data: bytes
    format: str
    final_url: str
    status: int
    redirects: int


def _refused(message: str, reason: str) -> FetchRefusedError:
    return FetchRefusedError(message, reason=reason)


def _ipv4_from_numbers(host: str) -> IPv4Address | None:
    """Read a host whose last label is a number the way inet_aton does (None: a name).

    `2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`, `169.254.43518` and `127.1` are all
    IPv4 addresses to getaddrinfo and to browsers. A host that ends in a number but is no
    valid address (`1.2.3.4.5`, `08.1.1.1`, `example.123`) is refused as ambiguous.
    """
    labels = host.split(".")
    if not _NUMERIC_LABEL.match(labels[-1]):
        return None
    if len(labels) > 4:
        raise _refused("host looks numeric but is not an IPv4 address", "url_invalid")
    values: list[int] = []
    for label in labels:
        try:
            if not _NUMERIC_LABEL.match(label) or label.lower() == "0x":
                raise ValueError(label)
            if label[:2].lower() == "0x":
                values.append(int(label[2:], 16))
            elif len(label) > 1 and label.startswith("0"):
                values.append(int(label, 8))
            else:
                values.append(int(label))
        except ValueError:
            raise _refused("host looks numeric but is not an IPv4 address", "url_invalid") from None
    *leading, last = values
    if any(value > 255 for value in leading) or last >= 256 ** (5 - len(values)):
        raise _refused("host looks numeric but is not an IPv4 address", "url_invalid")
    number = last
    for index, value in enumerate(leading):
        number += value << (8 * (3 - index))
    return IPv4Address(number)


def _normalise_host(raw: str) -> tuple[str, IPAddress | None]:
    """Lower-case a host name and validate it, or canonicalise an IP literal."""
    host = raw.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if ":" in host:
        if "%" in host:
            raise _refused("IPv6 zone identifiers are not allowed", "url_invalid")
        try:
            v6 = IPv6Address(host)
        except ValueError:
            raise _refused("invalid IPv6 address", "url_invalid") from None
        return str(v6), v6
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253:
        raise _refused("empty or overlong host", "url_invalid")
    v4 = _ipv4_from_numbers(host)
    if v4 is not None:
        return str(v4), v4
    if not all(_HOST_LABEL.match(label) for label in host.split(".")):
        raise _refused("invalid host name", "url_invalid")
    return host, None


def _parse_host_entry(entry: str) -> tuple[str, int | None]:
    """Parse an `allowed_hosts` entry: `host`, `host:port`, `[v6]` or `[v6]:port`."""
    entry = entry.strip().lower()
    port: int | None = None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
        port = int(port_text)
    else:
        host = entry
    return _normalise_host(host)[0], port


class CheckedResolver(AbstractResolver):
    """Resolves a host name, checks every address and returns only checked addresses.

    The fetcher's aiohttp connector resolves through it, so each new connection goes to an
    address that passed `address_refusal`, or whose host (or host:port) is in
    `allowed_hosts`; the fetcher also asks it before each request (`addresses`), so a
    refusal normally comes before aiohttp is involved at all. Failures are not OSErrors,
    so they leave the connector as they are: FetchRefusedError (`address_refused`) for a
    refused address, FetchFailedError for an unknown host or a bad answer, and
    `_RetryableError` for a resolver fault. An answer that passed is reused for `ttl_s`
    seconds per (host, port); only checked answers are ever kept.
    """

    def __init__(
        self,
        resolve: Resolver,
        allowed_hosts: frozenset[tuple[str, int | None]] = frozenset(),
        *,
        ttl_s: float = _ADDRESS_TTL_S,
    ) -> None:
        self._resolve = resolve
        self._allowed_hosts = allowed_hosts
        self._ttl_s = ttl_s
        self._cache: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}

    def exempt(self, host: str, port: int | None) -> bool:
        """Whether `host` (normalised), on `port`, is in `allowed_hosts`."""
        return (host, None) in self._allowed_hosts or (
            port is not None and (host, port) in self._allowed_hosts
        )

    def check(self, host: str, port: int, addresses: Sequence[IPAddress]) -> None:
        """Raise FetchRefusedError unless every address may be connected to."""
        if self.exempt(host, port):
            return
        for address in addresses:
            why = address_refusal(address)
            if why is not None:
                raise _refused(f"host {host!r} has a {why} address ({address})", "address_refused")

    async def addresses(self, host: str, port: int) -> tuple[str, ...]:
        """The checked addresses of `host` (a normalised name) for a connection to `port`."""
        key = (host, port)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        found = await self._lookup(host)
        self.check(host, port, found)
        checked = tuple(str(address) for address in found)
        self._cache.pop(key, None)
        if len(self._cache) >= _ADDRESS_CACHE_SIZE:
            del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[key] = (time.monotonic() + self._ttl_s, checked)
        return checked

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """aiohttp's resolver interface: only checked addresses, tagged with `host`."""
        name, literal = _normalise_host(host)
        if literal is not None:
            # aiohttp connects to IP literals without asking; checked here all the same.
            self.check(name, port, [literal])
            addresses: tuple[str, ...] = (name,)
        else:
            addresses = await self.addresses(name, port)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        """Nothing to release; the connector calls it when it closes."""

    async def _lookup(self, host: str) -> list[IPAddress]:
        try:
            answers = await self._resolve(host)
        except socket.gaierror as exc:
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
                raise FetchFailedError(
                    f"host {host!r} does not resolve", reason="fetch_failed"
                ) from exc
            raise _RetryableError(
                f"resolving {host!r} failed: {exc}", reason="fetch_failed"
            ) from exc
        except OSError as exc:
            raise _RetryableError(
                f"resolving {host!r} failed: {exc}", reason="fetch_failed"
            ) from exc
        try:
            addresses = [ip_address(answer) for answer in answers]
        except ValueError as exc:
            raise FetchFailedError(
                f"resolver gave a bad address: {exc}", reason="fetch_failed"
            ) from exc
        if not addresses:
            raise FetchFailedError(f"host {host!r} has no address", reason="fetch_failed")
        return addresses


class ImageFetcher:
    """Fetches images from untrusted URLs; one instance (one connection pool) per process.

    `resolver`: host -> addresses (default `resolve_host`), wrapped in `CheckedResolver`.
    `s3_client_factory`: builds the S3 client on first use, in a thread (default: boto3
    with the endpoint and region from settings and no retries of its own). `sleep` and
    `jitter` (a float in [0, 1)) drive the backoff between attempts. `ssl_context` replaces
    the default verifying context (tests trust their own CA with it); `trace_configs` are
    aiohttp's request hooks (tests watch connections with them); `address_ttl_s`: how long
    a checked DNS answer is reused. The aiohttp session is made on the first HTTP fetch, on
    the running loop, and closed by `aclose`.
    """

    def __init__(
        self,
        settings: FetchSettings,
        *,
        resolver: Resolver | None = None,
        s3_client_factory: S3ClientFactory | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
        ssl_context: ssl.SSLContext | None = None,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
        address_ttl_s: float = _ADDRESS_TTL_S,
    ) -> None:
        self._settings = settings
        self._s3_client_factory = s3_client_factory or (lambda: _default_s3_client(settings))
        self._s3_client: S3Reader | None = None
        self._s3_lock = asyncio.Lock()
        self._sleep = sleep
        self._backoff = Backoff(settings.backoff_base_s, settings.backoff_max_s, jitter=jitter)
        self._schemes = frozenset(s.lower() for s in settings.allowed_schemes) & _SUPPORTED_SCHEMES
        self._host_allowlist = tuple(_parse_host_entry(e)[0] for e in settings.host_allowlist)
        self._resolver = CheckedResolver(
            resolver if resolver is not None else resolve_host,
            frozenset(_parse_host_entry(e) for e in settings.allowed_hosts),
            ttl_s=address_ttl_s,
        )
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._trace_configs = list(trace_configs)
        self._timeout = aiohttp.ClientTimeout(
            total=None,  # the fetch's own deadline (total_timeout_s) covers every attempt
            connect=settings.connect_timeout_s,  # waiting for a pool slot included
            sock_connect=settings.connect_timeout_s,  # TCP and TLS handshake
            sock_read=settings.read_timeout_s,  # between two reads
        )
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool; later HTTP fetches raise RuntimeError."""
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _http_session(self) -> aiohttp.ClientSession:
        """The session, made on first use so that it belongs to the running loop."""
        if self._session is not None:
            return self._session
        if self._closed:
            raise RuntimeError("ImageFetcher is closed")
        connector = aiohttp.TCPConnector(
            limit=self._settings.max_connections,
            limit_per_host=self._settings.max_connections,
            # Every name goes through CheckedResolver, which keeps checked answers itself;
            # aiohttp's cache would only be a second copy with its own expiry.
            use_dns_cache=False,
            resolver=self._resolver,
            ssl=self._ssl,
            keepalive_timeout=_KEEPALIVE_S,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=_REQUEST_HEADERS,
            timeout=self._timeout,
            # Bodies stay as sent: no decompression bombs (Content-Encoding is refused).
            auto_decompress=False,
            # No proxies or netrc from the environment.
            trust_env=False,
            # Cookies from one untrusted origin are never kept, nor sent to another.
            cookie_jar=aiohttp.DummyCookieJar(),
            trace_configs=self._trace_configs or None,
        )
        return self._session

    async def fetch(self, url: str) -> FetchedImage:
        """Fetch one image; raises FetchRefusedError or FetchFailedError (module docstring)."""
        started = time.perf_counter()
        target = self._parse(url, hop=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.total_timeout_s
        budget = asyncio.timeout_at(deadline)
        attempts = _Attempts()
        try:
            async with budget:
                body = await self._fetch_with_retries(target, deadline, attempts)
        except TimeoutError as exc:
            if not budget.expired():
                raise
            raise FetchFailedError(
                f"no image within {self._settings.total_timeout_s} s",
                reason="fetch_timeout",
                attempts=attempts.made,
            ) from exc
        except BadInputError as exc:
            # Failed or refused on whichever attempt: say how many were made.
            exc.attempts = attempts.made
            raise
        return FetchedImage(
            data=body.data,
            format=body.format,
            final_url=body.final_url,
            status=body.status,
            attempts=attempts.made,
            redirects=body.redirects,
            elapsed_s=time.perf_counter() - started,
        )

    # -- URL policy ---------------------------------------------------------------------

    async def check(self, url: str) -> None:
        """Apply the URL policy to `url` without fetching it: what `fetch` checks before
        its first connection (the URL, the host lists, every address the host resolves
        to). Raises FetchRefusedError, or FetchFailedError when the host does not resolve.
        Redirects and the response are checked only by `fetch`.
        """
        target = self._parse(url, hop=False)
        if target.port is None:  # s3: the bucket name is all the policy knows
            return
        if target.address is not None:
            self._resolver.check(target.host, target.port, [target.address])
            return
        try:
            await self._resolver.addresses(target.host, target.port)
        except _RetryableError as exc:
            raise FetchFailedError(exc.message, reason=exc.reason) from exc

    def _parse(self, url: str, *, hop: bool) -> _Target:
        """Apply the URL policy; `hop` marks a redirect target (http and https only)."""
        if len(url) > self._settings.max_url_length:
            raise _refused(f"URL longer than {self._settings.max_url_length}", "url_invalid")
        if _URL_FORBIDDEN.search(url):
            raise _refused("URL contains whitespace, control characters or '\\'", "url_invalid")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise _refused("URL does not parse", "url_invalid") from None
        scheme = parsed.scheme
        if not scheme:
            raise _refused("URL has no scheme", "url_invalid")
        if scheme not in self._schemes or (hop and scheme not in _HTTP_SCHEMES):
            raise _refused(f"scheme {scheme[:16]!r} is not allowed", "scheme_refused")
        authority = re.split(r"[/?#]", url.split("//", 1)[1], maxsplit=1)[0] if "//" in url else ""
        if "@" in authority or parsed.userinfo:
            raise _refused("credentials in URLs are not allowed", "url_invalid")
        if not parsed.raw_host:
            raise _refused("URL has no host", "url_invalid")
        if scheme == "s3":
            return self._parse_s3(parsed, parsed.raw_host.decode("ascii").lower())
        host, address = _normalise_host(parsed.raw_host.decode("ascii"))
        port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[scheme]
        if not 0 < port < 65536:
            raise _refused("port out of range", "url_invalid")
        if not self._host_allowed(host, port):
            raise _refused(f"host {host!r} is not allow-listed", "host_refused")
        if isinstance(address, IPv4Address) and parsed.raw_host.decode("ascii") != host:
            # Send the canonical dotted quad, never the numeric spelling we normalised.
            parsed = parsed.copy_with(host=host)
        return _Target(url=parsed, scheme=scheme, host=host, port=port, address=address)

    def _parse_s3(self, parsed: httpx.URL, bucket: str) -> _Target:
        if not _S3_BUCKET.match(bucket) or parsed.port is not None:
            raise _refused("invalid S3 bucket name", "url_invalid")
        if parsed.query or not parsed.path.lstrip("/"):
            raise _refused("S3 URL needs a key and no query", "url_invalid")
        if self._host_allowlist and not self._host_allowed(bucket, None):
            raise _refused(f"bucket {bucket!r} is not allow-listed", "host_refused")
        return _Target(url=parsed, scheme="s3", host=bucket, port=None, address=None)

    def _host_allowed(self, host: str, port: int | None) -> bool:
        if not self._host_allowlist or self._resolver.exempt(host, port):
            return True
        return any(host == entry or host.endswith("." + entry) for entry in self._host_allowlist)

    # -- attempts -----------------------------------------------------------------------

    async def _fetch_with_retries(
        self, target: _Target, deadline: float, attempts: _Attempts
    ) -> _Body:
        loop = asyncio.get_running_loop()
        while True:
            attempts.made += 1
            attempt = attempts.made
            try:
                return await self._attempt(target)
            except _RetryableError as failure:
                delay = self._backoff.delay_s(attempt - 1)
                if failure.retry_after is not None:
                    delay = min(failure.retry_after, self._settings.backoff_max_s)
                if attempt >= self._settings.max_attempts or loop.time() + delay >= deadline:
                    raise FetchFailedError(
                        f"{failure.message} (attempt {attempt})", reason=failure.reason
                    ) from failure
                await self._sleep(delay)

    async def _attempt(self, target: _Target) -> _Body:
        """One attempt: follow redirects by hand, checking every hop."""
        current = target
        redirects = 0
        while True:
            if current.scheme == "s3":
                data = await self._get_s3(current)
                return _Body(data, _image_format(data), str(current.url), 200, redirects)
            outcome = await self._get_http(current)
            if isinstance(outcome, _Body):
                return _Body(
                    outcome.data, outcome.format, outcome.final_url, outcome.status, redirects
                )
            redirects += 1
            if redirects > self._settings.max_redirects:
                raise _refused(
                    f"more than {self._settings.max_redirects} redirects", "too_many_redirects"
                )
            try:
                location = str(current.url.join(outcome))
            except httpx.InvalidURL:
                raise _refused("redirect Location does not parse", "url_invalid") from None
            current = self._parse(location, hop=True)

    async def _get_http(self, target: _Target) -> _Body | str:
        """GET one URL: the body, or the Location of a redirect."""
        assert target.port is not None
        if target.address is not None:
            self._resolver.check(target.host, target.port, [target.address])
        else:
            # Resolve and check before the request; the connector, should it open a new
            # connection, asks the same resolver and gets the same checked answer.
            await self._resolver.addresses(target.host, target.port)
        session = self._http_session()
        url = yarl.URL(str(target.url), encoded=True)
        try:
            async with session.get(url, allow_redirects=False) as response:
                status = response.status
                if status in _REDIRECT_STATUSES:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchFailedError(
                            f"HTTP {status} without Location", reason="http_status"
                        )
                    return location
                if status == 429 or status >= 500:
                    raise _RetryableError(
                        f"HTTP {status} from {target.host}",
                        reason="http_status",
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                if status != 200:
                    raise FetchFailedError(
                        f"HTTP {status} from {target.host}", reason="http_status"
                    )
                data = await self._read_body(response)
        # aiohttp's timeouts (connect, pool, read) are TimeoutErrors; the fetch's own
        # deadline cancels this task instead and is told apart in `fetch`.
        except TimeoutError as exc:
            raise _RetryableError(
                f"{type(exc).__name__} from {target.host}", reason="fetch_timeout"
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise _refused(f"URL refused by the HTTP client: {exc}", "url_invalid") from exc
        except (aiohttp.ClientError, OSError) as exc:
            if _certificate_error(exc):
                raise FetchFailedError(
                    f"TLS certificate of {target.host} not valid", reason="fetch_failed"
                ) from exc
            raise _RetryableError(
                f"{type(exc).__name__} from {target.host}: {exc}", reason="fetch_failed"
            ) from exc
        return _Body(data, _image_format(data), str(target.url), status, 0)

    async def _read_body(self, response: aiohttp.ClientResponse) -> bytes:
        """Read the raw body up to `max_bytes`, refusing early what is not an image.

        Leaving early leaves the body unread, so the connection is closed, not reused.
        """
        limit = self._settings.max_bytes
        encoding = ",".join(response.headers.getall("Content-Encoding", ())).strip().lower()
        if encoding not in ("", "identity"):
            # Compressed bodies are never inflated (no decompression bombs); an image
            # sent compressed is not what we asked for with Accept-Encoding: identity.
            raise _refused(f"Content-Encoding {encoding[:32]!r} refused", "not_an_image")
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _refused(f"Content-Length {declared} over {limit} bytes", "too_large")
        body = bytearray()
        sniffed = False
        # auto_decompress is off: these are the bytes on the wire, de-chunked.
        while chunk := await response.content.readany():
            body += chunk
            if len(body) > limit:
                raise _refused(f"body over {limit} bytes", "too_large")
            if not sniffed and len(body) >= _SNIFF_BYTES:
                _image_format(bytes(body[:_SNIFF_BYTES]))
                sniffed = True
        return bytes(body)

    async def _get_s3(self, target: _Target) -> bytes:
        client = await self._s3()
        key = target.url.path.lstrip("/")
        return await asyncio.to_thread(self._read_s3_object, client, target.host, key)

    async def _s3(self) -> S3Reader:
        async with self._s3_lock:
            if self._s3_client is None:
                self._s3_client = await asyncio.to_thread(self._s3_client_factory)
            return self._s3_client

    def _read_s3_object(self, client: S3Reader, bucket: str, key: str) -> bytes:
        """GET one S3 object in a worker thread, capped at `max_bytes`."""
        limit = self._settings.max_bytes
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if isinstance(length, int) and length > limit:
                    raise _refused(f"object of {length} bytes over {limit}", "too_large")
                data = bytearray()
                for chunk in body.iter_chunks(_S3_CHUNK):
                    data += chunk
                    if len(data) > limit:
                        raise _refused(f"object over {limit} bytes", "too_large")
            finally:
                body.close()
        except ClientError as exc:
            meta = exc.response.get("ResponseMetadata", {})
            status = int(meta.get("HTTPStatusCode", 0))
            code = str(exc.response.get("Error", {}).get("Code", "unknown"))[:64]
            if status == 429 or status >= 500 or code in ("SlowDown", "RequestTimeout"):
                raise _RetryableError(f"S3 {code} ({status})", reason="http_status") from exc
            raise FetchFailedError(f"S3 {code} ({status})", reason="http_status") from exc
        except (ConnectTimeoutError, ReadTimeoutError) as exc:
            raise _RetryableError(f"S3 timeout: {exc}", reason="fetch_timeout") from exc
        except BotoCoreError as exc:
            raise _RetryableError(f"S3 failed: {exc}", reason="fetch_failed") from exc
        return bytes(data)


def _image_format(data: bytes) -> str:
    """The accepted format `data` starts with, or FetchRefusedError."""
    if not data:
        raise _refused("empty body", "not_an_image")
    fmt = sniff_format(data[:_SNIFF_BYTES])
    if fmt is None:
        raise _refused("body is not an image", "not_an_image")
    if fmt not in ACCEPTED_FORMATS:
        raise _refused(f"{fmt} images are refused", "format_refused")
    return fmt


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), if readable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _certificate_error(exc: BaseException) -> bool:
    """Whether a certificate verification failure caused `exc` (retrying cannot help)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _default_s3_client(settings: FetchSettings) -> S3Reader:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            # The fetcher retries with its own backoff and deadline.
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=settings.max_connections,
        ),
    )
