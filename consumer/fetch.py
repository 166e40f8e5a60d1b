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

The checked addresses travel with the request (`PinnedAddresses` in the request
extensions) and `PinnedTransport` connects to them and nowhere else, so DNS is asked once
and a rebinding answer cannot redirect the connection; TLS still verifies the certificate
against the URL's host name. Redirects are followed by hand, each hop checked again.

Raises `FetchRefusedError` (nothing more is read) with `reason` `url_invalid`,
`scheme_refused`, `host_refused`, `address_refused`, `too_many_redirects`, `too_large`,
`not_an_image` or `format_refused`; or `FetchFailedError` with `reason` `http_status`,
`fetch_timeout` or `fetch_failed` once retries (timeouts, connection errors, 429, 5xx; with
full-jitter exponential backoff) are spent or cannot help (other 4xx, unknown host).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import email.utils
import random
import re
import socket
import ssl
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from types import TracebackType
from typing import Any, Protocol

import httpcore
import httpx
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError

from consumer.errors import FetchFailedError, FetchRefusedError
from consumer.preprocess import ACCEPTED_FORMATS, sniff_format
from consumer.settings import FetchSettings

__all__ = [
    "PIN_EXTENSION",
    "FetchedImage",
    "ImageFetcher",
    "PinnedAddresses",
    "PinnedTransport",
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

PIN_EXTENSION = "category_suggester.pinned_addresses"

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
class PinnedAddresses:
    """The checked addresses a request may connect to, carried in its extensions.

    `host` is the URL's host exactly as the connection pool sees it (ASCII, lower case).
    """

    host: str
    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    scheme: str
    host: str  # lower case, no trailing dot, canonical text for IP literals
    port: int | None  # effective port (None for s3)
    address: IPAddress | None  # set when the host is an IP literal


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


class ImageFetcher:
    """Fetches images from untrusted URLs; one instance (one connection pool) per process.

    `transport`: the httpx transport (default `PinnedTransport`; tests pass
    `httpx.MockTransport`). `resolver`: host -> addresses (default `resolve_host`).
    `s3_client_factory`: builds the S3 client on first use, in a thread (default: boto3
    with the endpoint and region from settings and no retries of its own). `sleep` and
    `jitter` (a float in [0, 1)) drive the backoff between attempts.
    """

    def __init__(
        self,
        settings: FetchSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
        s3_client_factory: S3ClientFactory | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._settings = settings
        self._resolver: Resolver = resolver if resolver is not None else resolve_host
        self._s3_client_factory = s3_client_factory or (lambda: _default_s3_client(settings))
        self._s3_client: S3Reader | None = None
        self._s3_lock = asyncio.Lock()
        self._sleep = sleep
        self._jitter = jitter
        self._schemes = frozenset(s.lower() for s in settings.allowed_schemes) & _SUPPORTED_SCHEMES
        self._allowed_hosts = frozenset(_parse_host_entry(e) for e in settings.allowed_hosts)
        self._host_allowlist = tuple(_parse_host_entry(e)[0] for e in settings.host_allowlist)
        if transport is None:
            transport = PinnedTransport(
                limits=httpx.Limits(
                    max_connections=settings.max_connections,
                    max_keepalive_connections=settings.max_connections,
                    keepalive_expiry=15.0,
                )
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=_REQUEST_HEADERS,
            timeout=httpx.Timeout(
                connect=settings.connect_timeout_s,
                read=settings.read_timeout_s,
                write=settings.read_timeout_s,
                pool=settings.connect_timeout_s,
            ),
            follow_redirects=False,
            # No proxies, certificates or netrc from the environment.
            trust_env=False,
        )

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
        """Close the connection pool."""
        await self._client.aclose()

    async def fetch(self, url: str) -> FetchedImage:
        """Fetch one image; raises FetchRefusedError or FetchFailedError (module docstring)."""
        started = time.perf_counter()
        target = self._parse(url, hop=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.total_timeout_s
        budget = asyncio.timeout_at(deadline)
        try:
            async with budget:
                body, attempts = await self._fetch_with_retries(target, deadline)
        except TimeoutError as exc:
            if not budget.expired():
                raise
            raise FetchFailedError(
                f"no image within {self._settings.total_timeout_s} s",
                reason="fetch_timeout",
                retryable=True,
            ) from exc
        return FetchedImage(
            data=body.data,
            format=body.format,
            final_url=body.final_url,
            status=body.status,
            attempts=attempts,
            redirects=body.redirects,
            elapsed_s=time.perf_counter() - started,
        )

    # -- URL policy ---------------------------------------------------------------------

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
        if not self._host_allowlist or self._exempt(host, port):
            return True
        return any(host == entry or host.endswith("." + entry) for entry in self._host_allowlist)

    def _exempt(self, host: str, port: int | None) -> bool:
        """Whether `host` (and `port`) is in `allowed_hosts`."""
        return (host, None) in self._allowed_hosts or (
            port is not None and (host, port) in self._allowed_hosts
        )

    async def _pin(self, target: _Target) -> PinnedAddresses:
        """Resolve the host once and check every address it has (unless exempt)."""
        if target.address is not None:
            addresses: list[IPAddress] = [target.address]
        else:
            try:
                answers = await self._resolver(target.host)
            except socket.gaierror as exc:
                if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
                    raise FetchFailedError(
                        f"host {target.host!r} does not resolve", reason="fetch_failed"
                    ) from exc
                raise _RetryableError(
                    f"resolving {target.host!r} failed: {exc}", reason="fetch_failed"
                ) from exc
            except OSError as exc:
                raise _RetryableError(
                    f"resolving {target.host!r} failed: {exc}", reason="fetch_failed"
                ) from exc
            try:
                addresses = [ip_address(answer) for answer in answers]
            except ValueError as exc:
                raise FetchFailedError(
                    f"resolver gave a bad address: {exc}", reason="fetch_failed"
                ) from exc
            if not addresses:
                raise FetchFailedError(
                    f"host {target.host!r} has no address", reason="fetch_failed"
                )
        if not self._exempt(target.host, target.port):
            for address in addresses:
                why = address_refusal(address)
                if why is not None:
                    raise _refused(
                        f"host {target.host!r} has a {why} address ({address})",
                        "address_refused",
                    )
        return PinnedAddresses(
            host=target.url.raw_host.decode("ascii"),
            addresses=tuple(str(address) for address in addresses),
        )

    # -- attempts -----------------------------------------------------------------------

    async def _fetch_with_retries(self, target: _Target, deadline: float) -> tuple[_Body, int]:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(target), attempt
            except _RetryableError as failure:
                cap = min(
                    self._settings.backoff_max_s,
                    self._settings.backoff_base_s * 2 ** (attempt - 1),
                )
                delay = self._jitter() * cap
                if failure.retry_after is not None:
                    delay = min(failure.retry_after, self._settings.backoff_max_s)
                if attempt >= self._settings.max_attempts or loop.time() + delay >= deadline:
                    raise FetchFailedError(
                        f"{failure.message} (attempt {attempt})",
                        reason=failure.reason,
                        retryable=True,
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
        pin = await self._pin(target)
        request = self._client.build_request("GET", target.url, extensions={PIN_EXTENSION: pin})
        try:
            response = await self._client.send(request, stream=True)
            try:
                status = response.status_code
                if status in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchFailedError(
                            f"HTTP {status} without Location", reason="http_status"
                        )
                    return str(location)
                if status == 429 or status >= 500:
                    raise _RetryableError(
                        f"HTTP {status} from {target.host}",
                        reason="http_status",
                        retry_after=_retry_after(response.headers.get("retry-after")),
                    )
                if status != 200:
                    raise FetchFailedError(
                        f"HTTP {status} from {target.host}", reason="http_status"
                    )
                data = await self._read_body(response)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise _RetryableError(
                f"{type(exc).__name__} from {target.host}", reason="fetch_timeout"
            ) from exc
        except httpx.TransportError as exc:
            if _certificate_error(exc):
                raise FetchFailedError(
                    f"TLS certificate of {target.host} not valid", reason="fetch_failed"
                ) from exc
            raise _RetryableError(
                f"{type(exc).__name__} from {target.host}: {exc}", reason="fetch_failed"
            ) from exc
        return _Body(data, _image_format(data), str(target.url), status, 0)

    async def _read_body(self, response: httpx.Response) -> bytes:
        """Read the raw body up to `max_bytes`, refusing early what is not an image."""
        limit = self._settings.max_bytes
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Compressed bodies are never inflated (no decompression bombs); an image
            # sent compressed is not what we asked for with Accept-Encoding: identity.
            raise _refused(f"Content-Encoding {encoding[:32]!r} refused", "not_an_image")
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _refused(f"Content-Length {declared} over {limit} bytes", "too_large")
        body = bytearray()
        sniffed = False
        # With Content-Encoding identity (checked above) aiter_bytes yields the raw body; it
        # also serves a body a transport delivered already read (httpx.MockTransport).
        async for chunk in response.aiter_bytes():
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


# -- the pinning transport --------------------------------------------------------------

# The addresses the current request may connect to. Set by PinnedTransport around the
# pool call; httpcore opens a new connection inside that call, in the same task.
_PINNED: contextvars.ContextVar[PinnedAddresses | None] = contextvars.ContextVar(
    "category_suggester_pinned", default=None
)

_ERROR_MAP: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)
_HTTPCORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)


@contextlib.contextmanager
def _httpx_errors(request: httpx.Request) -> Iterator[None]:
    """Raise httpcore's exceptions as the httpx ones the fetcher handles."""
    try:
        yield
    except _HTTPCORE_ERRORS as exc:
        for core_type, httpx_type in _ERROR_MAP:
            if isinstance(exc, core_type):
                raise httpx_type(str(exc), request=request) from exc
        raise


class _PinningBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to the pinned addresses of the current request."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pin = _PINNED.get()
        if pin is None or pin.host != host:
            raise httpcore.ConnectError(f"no checked address for {host!r}; not connecting")
        failure: Exception | None = None
        for address in pin.addresses:
            try:
                return await self._inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        if failure is None:
            raise httpcore.ConnectError(f"no address to connect to for {host!r}")
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's interface)
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes], request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _httpx_errors(self._request):
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            with _httpx_errors(self._request):
                await close()


class PinnedTransport(httpx.AsyncBaseTransport):
    """An HTTP/1.1 connection pool that connects only to addresses the fetcher checked.

    Each request must carry `PinnedAddresses` for its host in
    `request.extensions[PIN_EXTENSION]`; the TCP connection goes to one of those
    addresses (tried in order), never to a fresh DNS answer. The URL keeps the host name,
    so the Host header, TLS SNI, certificate verification and the pool's keying per host
    are those of the name. A request without a matching pin fails with ConnectError.
    `network_backend` is for tests (httpcore's AsyncMockBackend); the default is anyio.
    """

    def __init__(
        self,
        *,
        limits: httpx.Limits,
        ssl_context: ssl.SSLContext | None = None,
        network_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=_PinningBackend(network_backend or httpcore.AnyIOBackend()),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pin = request.extensions.get(PIN_EXTENSION)
        if not isinstance(pin, PinnedAddresses) or pin.host != request.url.raw_host.decode("ascii"):
            raise httpx.ConnectError("request carries no checked address for its host")
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        token = _PINNED.set(pin)
        try:
            with _httpx_errors(request):
                core_response = await self._pool.handle_async_request(core_request)
        finally:
            _PINNED.reset(token)
        assert isinstance(core_response.stream, AsyncIterable)
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_PinnedResponseStream(core_response.stream, request),
            extensions=core_response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
