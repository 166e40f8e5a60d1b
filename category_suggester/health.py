"""The service's one HTTP port: `/metrics`, `/healthz` (liveness), `/readyz` (readiness).

Takes: a metrics registry and two checks, `alive()` (the poll loop is alive) and
`ready()` (the Triton model is ready and partitions are assigned). A deliberately small
HTTP/1.0 responder on asyncio streams: it serves probes and scrapes, nothing else, and
closes every connection after one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
_MAX_REQUEST_LINE = 8192
_READ_TIMEOUT_S = 5.0


class HealthServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        alive: Callable[[], bool],
        ready: Callable[[], Awaitable[bool]],
        host: str,
        port: int,
    ) -> None:
        self._registry = registry
        self._alive = alive
        self._ready = ready
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=_MAX_REQUEST_LINE
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                request_line = await reader.readline()
                # Drain the headers; nothing in them matters here.
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
            status, content_type, body = await self._route(request_line)
            head = (
                f"HTTP/1.0 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass  # a client that does not speak HTTP gets nothing
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _route(self, request_line: bytes) -> tuple[int, str, bytes]:
        parts = request_line.decode("latin-1").split()
        if len(parts) < 2:
            return 404, "text/plain", b"not found\n"
        method, path = parts[0], parts[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            ok = self._alive()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"poll loop dead\n"
        if path == "/readyz":
            ok = await self._ready()
            return (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
        return 404, "text/plain", b"not found\n"
