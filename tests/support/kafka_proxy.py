"""A TCP proxy in front of a Kafka listener that can hold back the broker's answer to
chosen requests, to put a client at a chosen step of the protocol.

Every request frame is `int32 size, int16 api_key, int16 api_version, int32
correlation_id, ...`; every response frame is `int32 size, int32 correlation_id, ...`,
in the order of the requests on that connection. The proxy reads the requests' headers,
remembers the correlation ids of requests whose API key has a rule, and holds the
matching responses (and, since a connection answers in order, everything behind them on
that connection) for the rule's delay. Nothing is rewritten.

The broker must advertise the proxy's address: clients connect where the Metadata
response tells them, not where they bootstrapped. `proxied_listener` gives the broker
properties for a listener of its own that the proxy fronts.

Runs its own event loop on a thread, for synchronous tests:

    proxy = KafkaProxy(upstream_port=external_port, port=proxy_port).start()
    rule = proxy.delay_responses(ApiKey.END_TXN, seconds=12, count=2)
    ...
    assert rule.matched == 2
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ApiKey(enum.IntEnum):
    """The Kafka API keys the fault tests aim at."""

    ADD_OFFSETS_TO_TXN = 25
    END_TXN = 26
    TXN_OFFSET_COMMIT = 28


@dataclass
class DelayRule:
    """Holds the responses to the next `count` requests of `api_key` for `seconds`."""

    api_key: int
    seconds: float
    count: int
    # Requests matched so far (their responses held), and responses let through after
    # the delay (fewer when the client gave up on a connection first: librdkafka drops a
    # connection whose request timed out, and the held response goes with it).
    matched: int = 0
    delayed: int = 0


def proxied_listener(*, broker_port: int, controller_port: int, external_port: int,
                     proxy_port: int) -> dict[str, str]:  # fmt: skip
    """Broker properties adding an EXTERNAL listener on `external_port` that advertises
    `proxy_port`: clients bootstrapping at the proxy are told to use the proxy for every
    connection, while the broker's own PLAINTEXT listener (inter-broker traffic, the
    tests' admin clients) stays direct."""
    return {
        "listeners": (
            f"PLAINTEXT://localhost:{broker_port},CONTROLLER://localhost:{controller_port},"
            f"EXTERNAL://localhost:{external_port}"
        ),
        "advertised.listeners": (
            f"PLAINTEXT://localhost:{broker_port},EXTERNAL://localhost:{proxy_port}"
        ),
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,EXTERNAL:PLAINTEXT"
        ),
    }


class KafkaProxy:
    """Forwards `localhost:port` to `localhost:upstream_port`; see the module docstring."""

    def __init__(self, *, upstream_port: int, port: int) -> None:
        self.upstream_port = upstream_port
        self.port = port
        self._rules: list[DelayRule] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.connections = 0

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def start(self) -> KafkaProxy:
        self._thread = threading.Thread(target=self._run, name="kafka-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the Kafka proxy did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError(f"the Kafka proxy could not listen: {self._startup_error}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def delay_responses(self, api_key: int, *, seconds: float, count: int = 1) -> DelayRule:
        """From now on, hold the responses to the next `count` requests of `api_key`."""
        rule = DelayRule(api_key, seconds, count)
        with self._lock:
            self._rules.append(rule)
        return rule

    def _match(self, api_key: int) -> DelayRule | None:
        with self._lock:
            for rule in self._rules:
                if rule.api_key == api_key and rule.matched < rule.count:
                    rule.matched += 1
                    return rule
        return None

    # -- the proxy's own event loop --------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, "localhost", self.port)
            )
        except OSError as exc:
            self._startup_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            broker_r, broker_w = await asyncio.open_connection("localhost", self.upstream_port)
        except OSError:
            client_w.close()
            return
        # Correlation id -> the rule whose delay its response waits out.
        held: dict[int, DelayRule] = {}
        upstream = asyncio.create_task(self._requests(client_r, broker_w, held))
        downstream = asyncio.create_task(self._responses(broker_r, client_w, held))
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        for task in (upstream, downstream):
            task.cancel()
        for writer in (client_w, broker_w):
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: dict[int, DelayRule]
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size_bytes, body = await _read_frame(reader)
                api_key, _version, correlation_id = struct.unpack(">hhi", body[:8])
                rule = self._match(api_key)
                if rule is not None:
                    held[correlation_id] = rule
                    log.info("holding the response to api %d (%d)", api_key, correlation_id)
                writer.write(size_bytes + body)
                await writer.drain()

    async def _responses(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, held: dict[int, DelayRule]
    ) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                size_bytes, body = await _read_frame(reader)
                (correlation_id,) = struct.unpack(">i", body[:4])
                rule = held.pop(correlation_id, None)
                if rule is not None:
                    started = time.monotonic()
                    await asyncio.sleep(rule.seconds)
                    rule.delayed += 1
                    log.info("response %d let through after %.1f s", correlation_id,
                             time.monotonic() - started)  # fmt: skip
                writer.write(size_bytes + body)
                await writer.drain()


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Kafka frame: its 4-byte big-endian size prefix and the body that follows."""
    size_bytes = await reader.readexactly(4)
    (size,) = struct.unpack(">i", size_bytes)
    return size_bytes, await reader.readexactly(size)
