"""The fetch step against a real HTTP(S) origin on a loopback port, through the real
aiohttp connector and CheckedResolver: pinning, redirects, size cap, timeouts and TLS
verification.
"""

from __future__ import annotations

import datetime
import http.server
import io
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from category_suggester.errors import FetchFailedError, FetchRefusedError
from category_suggester.fetch import ImageFetcher
from category_suggester.settings import FetchSettings

pytestmark = pytest.mark.integration


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 128, 255)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = png()


class Origin:
    """A threaded HTTP/1.1 server with a few behaviours, recording each request's Host."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.hosts: list[str] = []
        self.release = threading.Event()
        self.flaky_left = 1
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                origin.hosts.append(self.headers.get("Host", ""))
                if self.path == "/img.png":
                    self._send(200, PNG, "text/plain")
                elif self.path == "/redirect":
                    self._redirect("/img.png")
                elif self.path == "/redirect-metadata":
                    self._redirect("http://169.254.169.254/latest/meta-data/")
                elif self.path == "/flaky":
                    if origin.flaky_left > 0:
                        origin.flaky_left -= 1
                        self._send(503, b"busy")
                    else:
                        self._send(200, PNG, "image/png")
                elif self.path == "/endless":
                    self._endless()
                elif self.path == "/hang":
                    origin.release.wait(timeout=30)
                    self._send(200, PNG, "image/png")
                else:
                    self._send(404, b"not found")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _endless(self) -> None:
                # No Content-Length: the body ends when the connection closes, i.e. never.
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                chunk = PNG[:16] + b"\0" * (64 * 1024 - 16)
                try:
                    for _ in range(16 * 1024):  # 1 GiB at most, should the client not stop
                        self.wfile.write(chunk)
                except OSError:
                    return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if context is not None:
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.stop()


def images_test_resolver(host: str) -> Any:
    """`images.test` and `other.test` resolve to loopback, like a rebinding DNS answer."""

    async def resolve(name: str) -> list[str]:
        assert name in ("images.test", "other.test", host)
        return ["127.0.0.1"]

    return resolve


@pytest.fixture
async def fetcher(origin: Origin) -> AsyncIterator[ImageFetcher]:
    settings = FetchSettings(
        allowed_hosts=(f"127.0.0.1:{origin.port}", f"images.test:{origin.port}"),
        max_bytes=1024 * 1024,
        read_timeout_s=0.5,
        total_timeout_s=5.0,
        backoff_base_s=0.01,
        max_attempts=2,
    )
    async with ImageFetcher(settings, resolver=images_test_resolver("images.test")) as made:
        yield made


async def test_image_from_allowed_loopback_origin(fetcher: ImageFetcher, origin: Origin) -> None:
    fetched = await fetcher.fetch(f"http://127.0.0.1:{origin.port}/img.png")
    assert (fetched.data, fetched.format, fetched.status) == (PNG, "PNG", 200)


async def test_connection_goes_to_the_checked_address_with_the_host_name(
    fetcher: ImageFetcher, origin: Origin
) -> None:
    fetched = await fetcher.fetch(f"http://images.test:{origin.port}/img.png")
    assert fetched.data == PNG
    assert origin.hosts == [f"images.test:{origin.port}"]


async def test_rebinding_answer_is_refused_at_connect_time(origin: Origin) -> None:
    """`rebind.test` first answers a public address, then loopback (a DNS-rebinding
    origin). With answers kept no time at all, the connector's own lookup gets the
    loopback answer and must refuse it: nothing reaches the origin on loopback."""
    answers = [["93.184.216.34"], ["127.0.0.1"]]
    calls: list[str] = []

    async def rebinding(name: str) -> list[str]:
        calls.append(name)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    settings = FetchSettings(max_attempts=1)
    async with ImageFetcher(settings, resolver=rebinding, address_ttl_s=0.0) as fetcher:
        with pytest.raises(FetchRefusedError) as caught:
            await fetcher.fetch(f"http://rebind.test:{origin.port}/img.png")
    assert caught.value.reason == "address_refused"
    assert calls == ["rebind.test", "rebind.test"]
    assert origin.hosts == []


async def test_checked_answer_is_what_the_connection_uses(origin: Origin) -> None:
    """Within the answer's lifetime the name is not looked up again: a later rebinding
    answer cannot reach the connector."""
    answers = [["127.0.0.1"], ["169.254.169.254"]]
    calls: list[str] = []

    async def rebinding(name: str) -> list[str]:
        calls.append(name)
        return answers.pop(0) if len(answers) > 1 else answers[0]

    settings = FetchSettings(allowed_hosts=(f"images.test:{origin.port}",))
    async with ImageFetcher(settings, resolver=rebinding) as fetcher:
        for _ in range(3):
            fetched = await fetcher.fetch(f"http://images.test:{origin.port}/img.png")
            assert fetched.data == PNG
    assert calls == ["images.test"]
    assert origin.hosts == [f"images.test:{origin.port}"] * 3


async def test_loopback_refused_when_not_allowed(origin: Origin) -> None:
    async with ImageFetcher(FetchSettings()) as fetcher:
        with pytest.raises(FetchRefusedError) as caught:
            await fetcher.fetch(f"http://127.0.0.1:{origin.port}/img.png")
        assert caught.value.reason == "address_refused"
        with pytest.raises(FetchRefusedError) as caught:
            await fetcher.fetch(f"http://localhost:{origin.port}/img.png")
        assert caught.value.reason == "address_refused"
    assert origin.hosts == []


async def test_default_resolver_with_allowed_localhost(origin: Origin) -> None:
    settings = FetchSettings(allowed_hosts=(f"localhost:{origin.port}",))
    async with ImageFetcher(settings) as fetcher:
        fetched = await fetcher.fetch(f"http://localhost:{origin.port}/img.png")
    assert fetched.data == PNG


async def test_redirects(fetcher: ImageFetcher, origin: Origin) -> None:
    fetched = await fetcher.fetch(f"http://127.0.0.1:{origin.port}/redirect")
    assert fetched.redirects == 1
    assert fetched.final_url == f"http://127.0.0.1:{origin.port}/img.png"
    with pytest.raises(FetchRefusedError) as caught:
        await fetcher.fetch(f"http://127.0.0.1:{origin.port}/redirect-metadata")
    assert caught.value.reason == "address_refused"


async def test_retry_then_success(fetcher: ImageFetcher, origin: Origin) -> None:
    fetched = await fetcher.fetch(f"http://127.0.0.1:{origin.port}/flaky")
    assert fetched.attempts == 2


async def test_404(fetcher: ImageFetcher, origin: Origin) -> None:
    with pytest.raises(FetchFailedError) as caught:
        await fetcher.fetch(f"http://127.0.0.1:{origin.port}/missing.png")
    assert caught.value.reason == "http_status"
    assert len(origin.hosts) == 1


async def test_endless_body_is_cut(fetcher: ImageFetcher, origin: Origin) -> None:
    with pytest.raises(FetchRefusedError) as caught:
        await fetcher.fetch(f"http://127.0.0.1:{origin.port}/endless")
    assert caught.value.reason == "too_large"


async def test_read_timeout(fetcher: ImageFetcher, origin: Origin) -> None:
    with pytest.raises(FetchFailedError) as caught:
        await fetcher.fetch(f"http://127.0.0.1:{origin.port}/hang")
    assert caught.value.reason == "fetch_timeout"
    assert len(origin.hosts) == 2  # max_attempts


async def test_connection_refused_is_fetch_failed(origin: Origin) -> None:
    port = origin.port
    origin.stop()
    settings = FetchSettings(allowed_hosts=(f"127.0.0.1:{port}",), backoff_base_s=0.01)
    async with ImageFetcher(settings) as fetcher:
        with pytest.raises(FetchFailedError) as caught:
            await fetcher.fetch(f"http://127.0.0.1:{port}/img.png")
    assert caught.value.reason == "fetch_failed"


# -- TLS ---------------------------------------------------------------------------------


def certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf certificate for `images.test`; returns (ca, cert, key) paths."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject: str, issuer: Any, issuer_key: Any, key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = build("test CA", ca_name, ca_key, ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = build("images.test", ca_name, ca_key, leaf_key, ca=False)
    pem = serialization.Encoding.PEM
    paths = (folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    paths[0].write_bytes(ca_cert.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def test_tls_is_verified_against_the_host_name(tmp_path: Path) -> None:
    ca, cert, key = certificates(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    origin = Origin(server_context)
    try:
        client_context = ssl.create_default_context(cafile=str(ca))
        settings = FetchSettings(
            allowed_hosts=(f"images.test:{origin.port}", f"other.test:{origin.port}"),
            backoff_base_s=0.01,
        )
        async with ImageFetcher(
            settings, ssl_context=client_context, resolver=images_test_resolver("other.test")
        ) as fetcher:
            fetched = await fetcher.fetch(f"https://images.test:{origin.port}/img.png")
            assert fetched.data == PNG
            with pytest.raises(FetchFailedError) as caught:
                await fetcher.fetch(f"https://other.test:{origin.port}/img.png")
            assert caught.value.reason == "fetch_failed"
            assert caught.value.attempts == 1  # a bad certificate is not retried
    finally:
        origin.stop()
    assert origin.hosts == [f"images.test:{origin.port}"]
