"""An image origin for the benchmark: files from memory, a CDN's latency, a bandwidth cap.

Run as its own process (`python -m bench.origin --folder DIR --port-file FILE`), so its
CPU time is its own and it never competes with the harness's reader for the GIL. It serves
every file under `--folder` (read into memory at start) over HTTP/1.1 with keep-alive, and
before answering a request it waits a per-request latency drawn uniformly from
`latency_ms +- jitter_ms` (default 40 +- 20 ms, like a CDN or S3 GET). With `mbps` > 0 every
body is paced through one shared link of that many megabits per second.

Control endpoints (not delayed):

- `GET /_/config?latency_ms=..&jitter_ms=..&mbps=..` changes the behaviour from now on;
- `GET /_/stats` returns JSON: requests served since the last reset and the percentiles
  of their service time in ms (from the request read to the last body byte handed to the
  socket), which is the origin's own latency the service's latency is compared with;
- `GET /_/reset` clears the recorded times.

The chosen port is written to `--port-file` once the server listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

_CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
_CHUNK = 64 * 1024


@dataclass
class OriginConfig:
    latency_ms: float = 40.0
    jitter_ms: float = 20.0
    mbps: float = 0.0


@dataclass
class _State:
    files: dict[str, tuple[bytes, str]]
    config: OriginConfig
    times_ms: list[float] = field(default_factory=list)
    link_free_at: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(11))


def percentiles(values: list[float]) -> dict[str, float]:
    """count, p50, p95, p99 and max of `values` (nearest-rank); zeros when empty."""
    if not values:
        return {"count": 0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        index = min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))
        return ordered[index]

    return {
        "count": len(ordered),
        "p50": rank(0.50),
        "p95": rank(0.95),
        "p99": rank(0.99),
        "max": ordered[-1],
    }


def _load(folder: Path) -> dict[str, tuple[bytes, str]]:
    files = {}
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in _CONTENT_TYPES:
            files["/" + path.relative_to(folder).as_posix()] = (
                path.read_bytes(),
                _CONTENT_TYPES[path.suffix],
            )
    return files


async def _pace(state: _State, size: int) -> None:
    """Wait until `size` bytes have passed through the shared link."""
    rate = state.config.mbps * 1e6 / 8
    loop = asyncio.get_running_loop()
    start = max(loop.time(), state.link_free_at)
    state.link_free_at = start + size / rate
    await asyncio.sleep(state.link_free_at - loop.time())


async def _respond(
    writer: asyncio.StreamWriter, status: str, body: bytes, ctype: str, close: bool
) -> None:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    ).encode()
    writer.write(head + body)
    await writer.drain()


async def _control(state: _State, path: str, query: str) -> tuple[str, bytes]:
    if path == "/_/stats":
        return "200 OK", json.dumps(percentiles(state.times_ms)).encode()
    if path == "/_/reset":
        state.times_ms.clear()
        return "200 OK", b"{}"
    if path == "/_/config":
        params = {k: float(v[0]) for k, v in parse_qs(query).items()}
        for key, value in params.items():
            if not hasattr(state.config, key):
                return "400 Bad Request", f"unknown setting {key}".encode()
            setattr(state.config, key, value)
        return "200 OK", json.dumps(state.config.__dict__).encode()
    return "404 Not Found", b"unknown control path"


async def _serve_file(state: _State, writer: asyncio.StreamWriter, path: str, close: bool) -> None:
    started = time.perf_counter()
    config = state.config
    delay = config.latency_ms + state.rng.uniform(-config.jitter_ms, config.jitter_ms)
    if delay > 0:
        await asyncio.sleep(delay / 1000)
    entry = state.files.get(path)
    if entry is None:
        await _respond(writer, "404 Not Found", b"not found", "text/plain", close)
        return
    body, ctype = entry
    if config.mbps <= 0:
        await _respond(writer, "200 OK", body, ctype, close)
    else:
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
        ).encode()
        writer.write(head)
        for offset in range(0, len(body), _CHUNK):
            chunk = body[offset : offset + _CHUNK]
            await _pace(state, len(chunk))
            writer.write(chunk)
            await writer.drain()
    state.times_ms.append((time.perf_counter() - started) * 1000)


async def _handle(
    state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = [*lines[0].split(" "), "", ""][:3]
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            close = headers.get("connection", "").lower() == "close"
            url = urlsplit(target)
            if method != "GET":
                await _respond(writer, "405 Method Not Allowed", b"", "text/plain", True)
                return
            if url.path.startswith("/_/"):
                status, body = await _control(state, url.path, url.query)
                await _respond(writer, status, body, "application/json", close)
            else:
                await _serve_file(state, writer, url.path, close)
            if close:
                return
    except ConnectionError:
        return
    finally:
        writer.close()


async def serve(folder: Path, host: str, port: int, port_file: Path, config: OriginConfig) -> None:
    state = _State(_load(folder), config)
    server = await asyncio.start_server(
        lambda r, w: _handle(state, r, w), host, port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(bound))
    tmp.replace(port_file)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--latency-ms", type=float, default=40.0)
    parser.add_argument("--jitter-ms", type=float, default=20.0)
    parser.add_argument("--mbps", type=float, default=0.0)
    args = parser.parse_args()
    config = OriginConfig(args.latency_ms, args.jitter_ms, args.mbps)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.folder, args.host, args.port, args.port_file, config))


if __name__ == "__main__":
    main()
