"""A local HTTP origin for test images, on a free loopback port.

Serves files from a folder, plus a few behaviours under `/_/`: a status code
(`/_/status/503`), a redirect (`/_/redirect?to=URL`), and a request count per path so a
test can prove that something was, or was not, fetched.
"""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class ImageOrigin:
    def __init__(self, folder: Path, host: str = "127.0.0.1") -> None:
        self.folder = folder
        self.host = host
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def host_port(self) -> str:
        assert self._server is not None
        return f"{self.host}:{self._server.server_address[1]}"

    def url(self, name: str) -> str:
        return f"http://{self.host_port}/{name}"

    def add(self, name: str, data: bytes) -> str:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.url(name)

    def start(self) -> None:
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                parsed = urlparse(self.path)
                with origin._lock:
                    origin.hits[parsed.path] += 1
                if parsed.path.startswith("/_/status/"):
                    self._send(int(parsed.path.rsplit("/", 1)[1]), b"status\n")
                elif parsed.path == "/_/redirect":
                    target = parse_qs(parsed.query)["to"][0]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    path = (origin.folder / parsed.path.lstrip("/")).resolve()
                    if origin.folder.resolve() not in path.parents or not path.is_file():
                        self._send(404, b"not found\n")
                    else:
                        self._send(200, path.read_bytes(), "application/octet-stream")

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
