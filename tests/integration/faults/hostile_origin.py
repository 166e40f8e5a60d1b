"""An HTTP origin that misbehaves on purpose, on a free loopback port.

Paths (anything after them is ignored, so each event can have its own URL):

- `/slowloris/...`: answers 200 with a JPEG content type and a 1 MB Content-Length, then
  sends one body byte every half second, forever;
- `/endless/...`: a chunked body that starts like a JPEG and never ends, sent as fast as
  the client reads it;
- `/hang/...`: reads the request and never answers.

Every connection ends when the client goes away or `stop()` is called. `hits` counts
requests per kind, so a test can see retries happen.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections import Counter

_JPEG_START = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True


class HostileOrigin:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.hits: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._server: socketserver.ThreadingTCPServer | None = None

    @property
    def host_port(self) -> str:
        assert self._server is not None
        return f"{self.host}:{self._server.server_address[1]}"

    def url(self, kind: str, name: str) -> str:
        return f"http://{self.host_port}/{kind}/{name}.jpg"

    def start(self) -> None:
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                connection: socket.socket = self.request
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = connection.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                kind = request.split(b" ", 2)[1].decode(errors="replace").split("/")[1]
                with origin._lock:
                    origin.hits[kind] += 1
                try:
                    if kind == "slowloris":
                        origin._slowloris(connection)
                    elif kind == "endless":
                        origin._endless(connection)
                    else:
                        origin._stopping.wait()
                except OSError:
                    pass  # the client gave up, which is the point

        self._server = _Server((self.host, 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _slowloris(self, connection: socket.socket) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n"
        )
        for byte in _JPEG_START * 100_000:
            connection.sendall(bytes([byte]))
            if self._stopping.wait(0.5):
                return

    def _endless(self, connection: socket.socket) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        block = bytes(64 * 1024)
        first = _JPEG_START + block[len(_JPEG_START) :]
        for data in [first] + [block] * 1_000_000:
            if self._stopping.is_set():
                return
            connection.sendall(b"%x\r\n%s\r\n" % (len(data), data))
