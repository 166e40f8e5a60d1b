"""Loopback servers for the hostile-input tests.

`Canary`: a TCP listener on 127.0.0.1 and [::1] (the same free port) that accepts, records
and closes every connection. Hostile URLs point at it in every spelling; the service must
refuse them before connecting, so its record must stay empty.

`HostileOrigin`: an HTTP/1.1 origin whose paths misbehave the ways an attacker's server
would: endless bodies, compression bombs, lying lengths, stalls, redirect loops, and any
bytes under any content type (`add`).
"""

from __future__ import annotations

import errno
import gzip
import http.server
import selectors
import socket
import sys
import threading
from urllib.parse import parse_qs, urlparse

# The stall and drip handlers give up after this long even if never released.
_STALL_LIMIT_S = 60.0
_CHUNK = 64 * 1024


class Canary:
    def __init__(self) -> None:
        self.connections: list[str] = []
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for _ in range(20):
            v4 = socket.create_server(("127.0.0.1", 0))
            port = v4.getsockname()[1]
            v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                v6.bind(("::1", port))
            except OSError as exc:
                v4.close()
                v6.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            v6.listen()
            self.port, self._sockets = port, [v4, v6]
            break
        else:
            raise RuntimeError("no port free on both 127.0.0.1 and ::1")
        self._thread = threading.Thread(target=self._serve, name="canary", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            for sock in self._sockets:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.1):
                    listener = key.fileobj
                    assert isinstance(listener, socket.socket)
                    try:
                        conn, peer = listener.accept()
                    except BlockingIOError:
                        continue
                    with self._lock:
                        self.connections.append(str(peer))
                    conn.close()

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.connections)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._sockets:
            sock.close()


class HostileOrigin:
    """Paths (see `_Handler.do_GET`); `add(name, data, content_type)` serves any bytes."""

    def __init__(self, *, host: str = "127.0.0.1", max_bytes: int = 10 * 1024 * 1024) -> None:
        self.host = host
        self.max_bytes = max_bytes
        self.files: dict[str, tuple[bytes, str]] = {}
        self.release = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host_port(self) -> str:
        assert self._server is not None
        return f"{self.host}:{self._server.server_address[1]}"

    def url(self, path: str) -> str:
        return f"http://{self.host_port}/{path.lstrip('/')}"

    def add(self, name: str, data: bytes, content_type: str) -> str:
        self.files[name] = (data, content_type)
        return self.url(f"files/{name}")

    def start(self) -> None:
        origin = self

        class Handler(_Handler):
            pass

        Handler.origin = origin
        self._server = _QuietServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-request is what these paths provoke; anything else is
        # reported as usual.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    origin: HostileOrigin

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        parsed = urlparse(self.path)
        path = parsed.path
        query = parse_qs(parsed.query)
        try:
            if path.startswith("/files/"):
                data, content_type = self.origin.files[path.removeprefix("/files/")]
                self._send(200, data, content_type)
            elif path == "/endless-jpeg":
                self._endless(b"\xff\xd8\xff\xe0" + bytes(_CHUNK - 4), bytes(_CHUNK), "image/jpeg")
            elif path == "/endless-html":
                page = b"<html><body>" + b"<p>no image here</p>" * 3000
                self._endless(page, page, "image/jpeg")
            elif path == "/gzip-bomb":
                # 64 MiB of zeros in ~64 KiB, declared as a gzip-encoded PNG.
                bomb = gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(64 * 1024 * 1024), 9)
                self._send(200, bomb, "image/png", {"Content-Encoding": "gzip"})
            elif path == "/declared-over-cap":
                size = self.origin.max_bytes + 1
                self._headers(200, "image/jpeg", {"Content-Length": str(size)})
                self.wfile.write(b"\xff\xd8\xff\xe0")
                for _ in range(size // _CHUNK):
                    self.wfile.write(bytes(_CHUNK))
            elif path == "/short-body":
                self._headers(200, "image/jpeg", {"Content-Length": "100000"})
                self.wfile.write(b"\xff\xd8\xff\xe0" + bytes(1000))
                self.close_connection = True
            elif path == "/drip":
                self._headers(200, "image/jpeg", {"Content-Length": "1000000"})
                self.wfile.write(b"\xff\xd8\xff")
                while not self.origin.release.wait(0.2):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
            elif path == "/stall":
                self.origin.release.wait(_STALL_LIMIT_S)
                self.close_connection = True
            elif path == "/loop":
                self._redirect("/loop")
            elif path == "/redirect":
                self._redirect(query["to"][0])
            elif path == "/bad-location":
                self._redirect("http://[::1")
            elif path == "/no-location":
                self._send(302, b"", "text/plain")
            elif path.startswith("/status/"):
                self._send(int(path.rsplit("/", 1)[1]), b"status\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up reading, as it should on these paths.
            self.close_connection = True

    def _headers(self, status: int, content_type: str, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()

    def _send(
        self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None
    ) -> None:
        self._headers(status, content_type, {"Content-Length": str(len(body)), **(extra or {})})
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._headers(302, "text/plain", {"Location": location, "Content-Length": "0"})

    def _endless(self, first: bytes, rest: bytes, content_type: str) -> None:
        """A chunked body that never ends (until the client hangs up or the origin stops)."""
        self._headers(200, content_type, {"Transfer-Encoding": "chunked"})
        chunk = first
        while not self.origin.release.is_set():
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            chunk = rest
