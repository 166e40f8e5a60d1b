"""The try-a-photo page: a web app over the real pipeline (`python -m category_suggester web`).

A photo (an upload) or an image URL goes the way a seller's photo goes: the app publishes
a `listing-image-uploaded` event for it, the service fetches the image, classifies it and
publishes its answer, and the page shows the `category-suggestion` whose
`source_event_id` is the event's id, or the dead-letter record's reason. Nothing here
classifies anything; the app only stores, publishes and listens.

- Uploads are read as a multipart stream, one photo per request, and refused with 413 as
  soon as they pass `fetch.max_bytes` (the service's own fetch limit), before anything is
  stored. Accepted ones are written to the upload folder and served under `/uploads/` on
  this app's port: the origin the service fetches them from (`web.upload_origin`, which
  must be in `fetch.allowed_hosts`). Whether the bytes are an image is left to the
  service, so a text file or a decompression bomb comes back as its dead-letter reason.
- A pasted URL is checked with the service's URL policy (`ImageFetcher.check`: schemes,
  host lists, resolved addresses) before anything is published; a refusal is a 400
  naming the reason the service would have dead-lettered it with.
- Answers are read by one Kafka consumer that is assigned every partition of the output
  and dead-letter topics from their end at start (no group is joined, so the service's
  group never sees it). The page long-polls `/api/answers/<event_id>`; after
  `web.answer_timeout_s` without an answer it says what is missing, from the service's
  `/readyz` and Triton's readiness.
- A stored upload is deleted when its answer arrives, and in any case after
  `web.upload_ttl_s` (a sweep also removes files a previous run left behind).

Routes: `GET /` (the page; `category_suggester/static/`), `POST /api/photos` (multipart field
`photo`), `POST /api/urls` (JSON `{"url": ...}`), `GET /api/answers/<event_id>`,
`GET /api/status`, `GET /uploads/<name>`. Errors are JSON `{"error": reason, "message":
text}`; no handler lets a traceback reach the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import aiohttp
import tritonclient.grpc.aio as grpcaio
from aiohttp import web
from confluent_kafka import Consumer, KafkaException, TopicPartition
from tritonclient.utils import InferenceServerException

from category_suggester.client import Answer, read_answer, sample_event
from category_suggester.errors import (
    EventDecodeError,
    FetchFailedError,
    FetchRefusedError,
    PublishError,
)
from category_suggester.events import EventCodec, ListingImageUploaded
from category_suggester.events.codec import codec_from_settings as make_codec
from category_suggester.fetch import ImageFetcher
from category_suggester.publish import Publisher
from category_suggester.settings import Settings
from category_suggester.threads import NamedThread

__all__ = [
    "KafkaAnswers",
    "KafkaEventSink",
    "PipelineProbe",
    "Readiness",
    "create_app",
    "serve",
]

log = logging.getLogger(__name__)

UPLOAD_FIELD: Final = "photo"
# The longest one long-poll holds a request; the page asks again until the timeout.
MAX_POLL_S: Final = 20.0
_CHUNK: Final = 64 * 1024
_PROBE_TIMEOUT_S: Final = 2.0
_STATIC: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# The page runs only its own script and style; images may come from pasted URLs.
_CSP: Final = (
    "default-src 'self'; img-src 'self' blob: data: http: https:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


class EventSink(Protocol):
    """Where events go: the input topic (`KafkaEventSink`), or a fake in unit tests."""

    async def publish(self, event: ListingImageUploaded) -> None:
        """Publish `event`; returns once the broker acknowledged it. Raises PublishError."""
        ...


class Probe(Protocol):
    async def readiness(self) -> Readiness: ...


UrlPolicy = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Readiness:
    """What the page can tell of the pipeline: the service's `/readyz` (`ready`,
    `not_ready`, `down`) and Triton with the model (`ready`, `model_not_ready`, `down`)."""

    service: str
    triton: str
    service_url: str
    triton_url: str
    model_name: str

    def missing(self) -> str:
        """What keeps answers from coming, in a sentence (or a guess when all is ready)."""
        triton = {
            "down": f"Triton does not answer at {self.triton_url}",
            "model_not_ready": (
                f"Triton at {self.triton_url} is up but the model {self.model_name} is not ready"
            ),
        }.get(self.triton)
        if self.service == "down":
            text = (
                f"the service is not running (nothing answers at {self.service_url}/readyz); "
                "start it with `make run` or `python -m category_suggester run`"
            )
            return f"{text}; and {triton}" if triton else text
        if triton:
            return f"{triton}; the service waits for it and answers once it is ready"
        if self.service == "not_ready":
            return (
                f"the service is running but not ready ({self.service_url}/readyz): it has "
                "no partitions of the input topic assigned yet"
            )
        return (
            "the service and Triton are both ready, yet no answer came: the service may be "
            "working through a backlog, or it reads other topics than this page"
        )


@dataclass
class _Photo:
    event_id: str
    published_at: float  # monotonic
    upload: Path | None
    answer: asyncio.Future[Answer]


@dataclass
class Photos:
    """The photos this app published and their answers, by event id (the event loop's)."""

    upload_dir: Path
    ttl_s: float
    _photos: dict[str, _Photo] = field(default_factory=dict, init=False)

    def expect(self, event_id: str, upload: Path | None) -> _Photo:
        photo = _Photo(
            event_id, time.monotonic(), upload, asyncio.get_running_loop().create_future()
        )
        self._photos[event_id] = photo
        return photo

    def get(self, event_id: str) -> _Photo | None:
        return self._photos.get(event_id)

    def deliver(self, answer: Answer) -> None:
        """Settle the photo `answer` answers, if it is ours; its upload is not needed now.

        A second answer (a redelivered event) is ignored: the first one is shown."""
        photo = self._photos.get(answer.event_id or "")
        if photo is None or photo.answer.done():
            return
        photo.answer.set_result(answer)
        _remove(photo.upload)

    def drop(self, event_id: str) -> None:
        """Forget a photo whose event could not be published."""
        photo = self._photos.pop(event_id, None)
        if photo is not None:
            _remove(photo.upload)
            photo.answer.cancel()

    def sweep(self) -> int:
        """Forget photos older than the TTL and delete uploads older than it (those of
        earlier runs too); returns how many files were deleted."""
        now = time.monotonic()
        for event_id in [e for e, p in self._photos.items() if now - p.published_at > self.ttl_s]:
            self._photos.pop(event_id).answer.cancel()
        cutoff = time.time() - self.ttl_s
        deleted = 0
        for path in self.upload_dir.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    deleted += 1
        return deleted


PHOTOS: Final = web.AppKey("photos", Photos)


def _remove(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)


def _error(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": reason, "message": message}, status=status)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def upload_origin(settings: Settings) -> str:
    """The host:port the service fetches uploads from (see `WebSettings.upload_origin`)."""
    web_settings = settings.web
    if web_settings.upload_origin:
        return web_settings.upload_origin
    host = web_settings.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104  (an address to bind, not to reach)
        host = "127.0.0.1"
    return f"[{host}]:{web_settings.port}" if ":" in host else f"{host}:{web_settings.port}"


def origin_allowed(settings: Settings) -> bool:
    """Whether `fetch.allowed_hosts` admits the upload origin (as host:port or as host)."""
    origin = upload_origin(settings).lower()
    host = origin.rsplit(":", 1)[0]
    return origin in settings.fetch.allowed_hosts or host in settings.fetch.allowed_hosts


def service_url(settings: Settings) -> str:
    """Base URL of the service's health port (see `WebSettings.service_url`)."""
    if settings.web.service_url:
        return settings.web.service_url.rstrip("/")
    host = settings.observability.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104
        host = "127.0.0.1"
    return f"http://{host}:{settings.observability.port}"


class _Handlers:
    def __init__(
        self,
        settings: Settings,
        photos: Photos,
        sink: EventSink,
        probe: Probe,
        url_policy: UrlPolicy,
    ) -> None:
        self._settings = settings
        self._photos = photos
        self._sink = sink
        self._probe = probe
        self._url_policy = url_policy
        self._origin = upload_origin(settings)
        self._static = {
            name: (resources.files("category_suggester") / "static" / name).read_bytes()
            for name in _STATIC
        }

    async def page(self, request: web.Request) -> web.Response:
        return self._static_response("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise web.HTTPNotFound()
        return self._static_response(name)

    def _static_response(self, name: str) -> web.Response:
        response = web.Response(body=self._static[name], content_type=_STATIC[name])
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def upload(self, request: web.Request) -> web.Response:
        limit = self._settings.fetch.max_bytes
        try:
            reader = await request.multipart()
            part = await reader.next()
            while part is not None and (
                not isinstance(part, aiohttp.BodyPartReader) or part.name != UPLOAD_FIELD
            ):
                await part.release()
                part = await reader.next()
        except (ValueError, AssertionError, aiohttp.ClientError):
            # aiohttp asserts on a request that is not multipart at all.
            part = None
        if part is None:
            return _error(
                400, "no_photo", f"send the photo as the multipart/form-data field {UPLOAD_FIELD!r}"
            )
        name = part.filename or "the file"
        data = bytearray()
        # Read as it arrives: the limit holds before anything is stored or published.
        while chunk := await part.read_chunk(_CHUNK):
            data += chunk
            if len(data) > limit:
                return _error(
                    413,
                    "too_large",
                    f"{name} is larger than the {_mib(limit)} limit (the service's "
                    "SUGGESTER_FETCH__MAX_BYTES); nothing was stored",
                )
        if not data:
            return _error(400, "empty", f"{name} is empty")
        token = uuid.uuid4().hex
        path = self._photos.upload_dir / token
        await asyncio.to_thread(path.write_bytes, bytes(data))
        return await self._publish(
            f"http://{self._origin}/uploads/{token}", upload=path, size=len(data)
        )

    async def submit_url(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        url = body.get("url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url.strip():
            return _error(400, "no_url", 'send JSON {"url": "<image URL>"}')
        url = url.strip()
        try:
            await self._url_policy(url)
        except (FetchRefusedError, FetchFailedError) as exc:
            return _error(
                400,
                exc.reason,
                f"the service would not fetch this URL: {exc.message}",
            )
        return await self._publish(url, upload=None, size=None)

    async def _publish(self, url: str, *, upload: Path | None, size: int | None) -> web.Response:
        event = sample_event(url)
        event_id = str(event.event_id)
        self._photos.expect(event_id, upload)
        try:
            await self._sink.publish(event)
        except PublishError as exc:
            self._photos.drop(event_id)
            return _error(
                503,
                "publish_failed",
                f"Kafka did not take the event ({self._settings.kafka.bootstrap_servers}): "
                f"{exc.message}",
            )
        return web.json_response(
            {
                "event_id": event_id,
                "listing_id": event.listing_id,
                "image_url": url,
                "size": size,
                "timeout_s": self._settings.web.answer_timeout_s,
            },
            status=202,
        )

    async def answer(self, request: web.Request) -> web.Response:
        photo = self._photos.get(request.match_info["event_id"])
        if photo is None:
            return _error(404, "unknown_event", "no photo with this event id (or it expired)")
        try:
            wait = min(float(request.query.get("wait", MAX_POLL_S)), MAX_POLL_S)
        except ValueError:
            wait = MAX_POLL_S
        timeout_s = self._settings.web.answer_timeout_s
        left = photo.published_at + timeout_s - time.monotonic()
        if not photo.answer.done() and left > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(photo.answer), max(0.0, min(wait, left)))
        if photo.answer.done():
            return web.json_response(_answer_json(photo.answer.result()))
        if time.monotonic() - photo.published_at < timeout_s:
            return web.json_response({"state": "pending", "event_id": photo.event_id})
        readiness = await self._probe.readiness()
        return web.json_response(
            {
                "state": "timeout",
                "event_id": photo.event_id,
                "message": f"no answer within {timeout_s:.0f} s: {readiness.missing()}",
                "service": readiness.service,
                "triton": readiness.triton,
            }
        )

    async def status(self, request: web.Request) -> web.Response:
        readiness = await self._probe.readiness()
        allowed = origin_allowed(self._settings)
        return web.json_response(
            {
                "service": readiness.service,
                "triton": readiness.triton,
                "model_name": readiness.model_name,
                "max_bytes": self._settings.fetch.max_bytes,
                "input_topic": self._settings.kafka.input_topic,
                "upload_origin": self._origin,
                "upload_origin_allowed": allowed,
                "answer_timeout_s": self._settings.web.answer_timeout_s,
            }
        )

    async def stored_upload(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        path = self._photos.upload_dir / token
        if not (len(token) == 32 and token.isalnum()) or not path.is_file():
            raise web.HTTPNotFound()
        data = await asyncio.to_thread(path.read_bytes)
        return web.Response(body=data, content_type="application/octet-stream")


def _answer_json(answer: Answer) -> dict[str, Any]:
    if answer.suggestion is not None:
        return {"state": "suggested", "suggestion": answer.suggestion.model_dump(mode="json")}
    assert answer.dead_letter is not None
    return {"state": "dead_lettered", "dead_letter": answer.dead_letter.model_dump(mode="json")}


@web.middleware
async def _no_tracebacks(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A bug answers a short JSON error (the traceback goes to the log, not the page)."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("request failed", extra={"path": request.path})
        return _error(500, "internal_error", "the page's server failed; see its log")


def create_app(
    settings: Settings,
    *,
    sink: EventSink,
    probe: Probe,
    url_policy: UrlPolicy,
    upload_dir: Path,
) -> web.Application:
    """The web app, its I/O passed in; `app[PHOTOS]` takes the answers (`Photos.deliver`).

    Runs the TTL sweep of `upload_dir` while it runs.
    """
    app = web.Application(middlewares=[_no_tracebacks])
    photos = Photos(upload_dir, settings.web.upload_ttl_s)
    app[PHOTOS] = photos
    handlers = _Handlers(settings, photos, sink, probe, url_policy)
    app.router.add_get("/", handlers.page)
    app.router.add_get("/static/{name}", handlers.static)
    app.router.add_post("/api/photos", handlers.upload)
    app.router.add_post("/api/urls", handlers.submit_url)
    app.router.add_get("/api/answers/{event_id}", handlers.answer)
    app.router.add_get("/api/status", handlers.status)
    app.router.add_get("/uploads/{token}", handlers.stored_upload)
    app.cleanup_ctx.append(_sweeping)
    return app


async def _sweeping(app: web.Application) -> AsyncIterator[None]:
    photos = app[PHOTOS]
    interval = min(60.0, photos.ttl_s / 4)

    async def sweep() -> None:
        while True:
            await asyncio.sleep(interval)
            photos.sweep()

    task = asyncio.create_task(sweep())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --------------------------------------------------------------------- real I/O


class KafkaEventSink:
    """Publishes events to the input topic with the service's codec and producer."""

    def __init__(self, settings: Settings, codec: EventCodec) -> None:
        self._publisher = Publisher(settings)
        self._codec = codec
        self._topic = settings.kafka.input_topic

    def start(self) -> None:
        self._publisher.start()

    async def publish(self, event: ListingImageUploaded) -> None:
        value = self._codec.encode_uploaded(event)
        await self._publisher.publish(self._topic, event.listing_id.encode(), value)

    async def close(self) -> None:
        await self._publisher.close()


class KafkaAnswers:
    """Reads the output and dead-letter topics from their end, on a thread of its own,
    and hands every answer to `deliver` on the event loop.

    Every partition is assigned by hand at the end offset it had at `start`, so no group
    is joined and nothing is committed; read_committed, as the service's readers.
    """

    POLL_S: Final = 0.2

    def __init__(
        self, settings: Settings, codec: EventCodec, deliver: Callable[[Answer], None]
    ) -> None:
        kafka = settings.kafka
        self._input_topic = kafka.input_topic
        self._topics = (kafka.output_topic, kafka.dlq_topic)
        self._output_topic = kafka.output_topic
        self._bootstrap = kafka.bootstrap_servers
        self._codec = codec
        self._deliver = deliver
        self._consumer = Consumer(
            kafka.common_config()
            | {
                "group.id": f"category-suggester-web-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        self._stop = threading.Event()
        self._thread = NamedThread(target=self._run, name="web-answers", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, timeout_s: float = 10.0) -> None:
        """Assign every partition at its end and start reading; answers are handed over
        on `loop`. Blocking. Raises RuntimeError when Kafka does not answer or a topic
        (the input topic included) is missing."""
        self._loop = loop
        assignment: list[TopicPartition] = []
        try:
            metadata = self._consumer.list_topics(timeout=timeout_s)
            for topic in (self._input_topic, *self._topics):
                found = metadata.topics.get(topic)
                if found is None or found.error is not None or not found.partitions:
                    raise RuntimeError(
                        f"topic {topic} does not exist on {self._bootstrap}; start the stack "
                        "(make stack or make run) or set SUGGESTER_KAFKA__*_TOPIC"
                    )
                if topic == self._input_topic:
                    continue
                for partition in found.partitions:
                    tp = TopicPartition(topic, partition)
                    _, end = self._consumer.get_watermark_offsets(tp, timeout=timeout_s)
                    assignment.append(TopicPartition(topic, partition, end))
        except KafkaException as exc:
            raise RuntimeError(f"Kafka at {self._bootstrap} does not answer: {exc}") from exc
        self._consumer.assign(assignment)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._consumer.close()

    def _run(self) -> None:
        assert self._loop is not None
        while not self._stop.is_set():
            message = self._consumer.poll(self.POLL_S)
            if message is None or message.error() is not None:
                continue
            try:
                answer = read_answer(message, self._codec, self._output_topic)
            except EventDecodeError as exc:
                log.warning("an answer does not decode", extra={"reason": exc.reason})
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                self._loop.call_soon_threadsafe(self._deliver, answer)


class PipelineProbe:
    """Asks the service's `/readyz` and Triton's server and model readiness."""

    def __init__(self, settings: Settings) -> None:
        self._service_url = service_url(settings)
        self._triton_url = settings.triton.url
        self._model = settings.triton.model_name
        self._version = settings.triton.model_version

    async def readiness(self) -> Readiness:
        service, triton = await asyncio.gather(self._service(), self._triton())
        return Readiness(service, triton, self._service_url, self._triton_url, self._model)

    async def _service(self) -> str:
        timeout = aiohttp.ClientTimeout(total=_PROBE_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
                session.get(f"{self._service_url}/readyz") as response,
            ):
                return "ready" if response.status == 200 else "not_ready"
        except (aiohttp.ClientError, TimeoutError):
            return "down"

    async def _triton(self) -> str:
        client = grpcaio.InferenceServerClient(self._triton_url)
        try:
            if not await client.is_server_ready(client_timeout=_PROBE_TIMEOUT_S):
                return "down"
            ready = await client.is_model_ready(
                self._model, self._version, client_timeout=_PROBE_TIMEOUT_S
            )
            return "ready" if ready else "model_not_ready"
        except InferenceServerException:
            return "down"
        finally:
            await client.close()


def _upload_dir(settings: Settings, stack: contextlib.ExitStack) -> Path:
    """The configured upload folder (created), else a temporary one the stack removes."""
    if settings.web.upload_dir:
        upload_dir = Path(settings.web.upload_dir)
        upload_dir.mkdir(parents=True, exist_ok=True)
        return upload_dir
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="web-")))


async def serve(settings: Settings) -> None:
    """Run the page until SIGINT or SIGTERM; prints its URL once it listens.

    Raises RuntimeError when Kafka does not answer or a topic is missing (at start).
    """
    codec = make_codec(settings)
    with contextlib.ExitStack() as stack:
        upload_dir = _upload_dir(settings, stack)
        fetcher = ImageFetcher(settings.fetch)
        sink = KafkaEventSink(settings, codec)
        app = create_app(
            settings,
            sink=sink,
            probe=PipelineProbe(settings),
            url_policy=fetcher.check,
            upload_dir=upload_dir,
        )
        answers = KafkaAnswers(settings, codec, app[PHOTOS].deliver)
        await asyncio.to_thread(answers.start, asyncio.get_running_loop())
        sink.start()
        runner = web.AppRunner(app, access_log=None)
        try:
            await runner.setup()
            site = web.TCPSite(runner, settings.web.host, settings.web.port)
            await site.start()
            origin = upload_origin(settings)
            if not origin_allowed(settings):
                log.warning(
                    "the service will refuse uploads: add the upload origin to "
                    "SUGGESTER_FETCH__ALLOWED_HOSTS",
                    extra={"upload_origin": origin},
                )
            print(f"try a photo: http://{origin}/", flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()
            await sink.close()
            await fetcher.aclose()
            await asyncio.to_thread(answers.close)
