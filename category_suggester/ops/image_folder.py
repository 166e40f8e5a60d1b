"""The images `produce-sample` publishes: a folder served over HTTP, or a list of URLs.

`image_urls` takes a folder or a text file and returns the URLs to publish (and the
folder to serve, if any); `serve_folder` serves that folder read-only on host:port from
a daemon thread until the returned server is shut down. Raises `SystemExit` for a folder
without images.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from typing import Final

IMAGE_SUFFIXES: Final = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def image_urls(source: str, host: str, port: int) -> tuple[list[str], Path | None]:
    """The URLs to publish, and the folder to serve on host:port (None for a URL list).

    A folder gives one URL per image file under it (`.jpg`, `.jpeg`, `.png`, `.webp`);
    any other file is read as one URL a line, `#` starting a comment line.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SystemExit(f"no .jpg/.png/.webp images under {path}")
        urls = [f"http://{host}:{port}/{f.relative_to(path).as_posix()}" for f in files]
        return urls, path
    lines = path.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")], None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_folder(folder: Path, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Serve `folder` on host:port in a daemon thread; `shutdown()` the result to stop."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
