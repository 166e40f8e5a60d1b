"""`python -m category_suggester produce-sample`: publish sample events, print the answers.

Takes a folder of images (served over HTTP by `image_folder.serve_folder` while the
answers are awaited) or a text file of image URLs; publishes one `listing-image-uploaded`
event per image to the input topic and prints, for each, the suggestion or the
dead-letter reason the service answered with. Exits 1 when an answer did not arrive
within `--wait-s`. Raises `RuntimeError` when the broker does not acknowledge the events.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from typing import Final

from confluent_kafka import Consumer, Producer

from category_suggester.client import read_answer, sample_event
from category_suggester.events import EventCodec, codec_from_settings
from category_suggester.ops.image_folder import image_urls, serve_folder
from category_suggester.publish import producer_config
from category_suggester.settings import Settings

HELP: Final = "publish events for images in a folder or a URL list"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--images", required=True, help="a folder of images, or a text file of image URLs"
    )
    parser.add_argument("--serve-host", default="127.0.0.1")
    parser.add_argument("--serve-port", type=int, default=8090, help="port the folder is served on")
    parser.add_argument("--count", type=int, default=None, help="events to publish (cycles)")
    parser.add_argument(
        "--wait-s", type=float, default=60.0, help="wait this long for the answers (0: don't)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Publish and print for parsed `add_arguments` options; 1 when an answer is missing."""
    ok = produce_sample(
        settings,
        source=args.images,
        host=args.serve_host,
        port=args.serve_port,
        count=args.count,
        wait_s=args.wait_s,
    )
    return 0 if ok else 1


def produce_sample(
    settings: Settings,
    *,
    source: str,
    host: str,
    port: int,
    count: int | None,
    wait_s: float,
) -> bool:
    """Publish one event per image; print each answer (suggestion or DLQ record).

    A folder is served over HTTP on host:port for as long as the answers are awaited;
    the service must list it in SUGGESTER_FETCH__ALLOWED_HOSTS. Returns True when every
    event was answered within `wait_s` (or when not waiting).
    """
    kafka = settings.kafka
    codec = codec_from_settings(settings)
    urls, folder = image_urls(source, host, port)
    server = serve_folder(folder, host, port) if folder is not None else None
    watcher = Consumer(
        kafka.common_config()
        | {
            "group.id": f"produce-sample-{uuid.uuid4()}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        watcher.subscribe([kafka.output_topic, kafka.dlq_topic])
        _wait_for_assignment(watcher)
        producer = Producer(producer_config(settings))
        sent: dict[str, str] = {}
        for url in _cycle(urls, count or len(urls)):
            event = sample_event(url)
            producer.produce(
                kafka.input_topic, key=event.listing_id.encode(), value=codec.encode_uploaded(event)
            )
            sent[event.listing_id] = url
        if producer.flush(30) != 0:
            raise RuntimeError("sample events were not acknowledged by the broker")
        print(f"published {len(sent)} event(s) to {kafka.input_topic}")
        if wait_s <= 0:
            return True
        return _print_answers(watcher, codec, sent, kafka.output_topic, wait_s)
    finally:
        watcher.close()
        if server is not None:
            server.shutdown()


def _wait_for_assignment(consumer: Consumer, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise RuntimeError("no partitions assigned to the answer watcher")
        consumer.poll(0.2)


def _print_answers(
    watcher: Consumer, codec: EventCodec, sent: dict[str, str], output_topic: str, wait_s: float
) -> bool:
    pending = dict(sent)
    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        message = watcher.poll(0.5)
        if message is None or message.error():
            continue
        key = (message.key() or b"").decode(errors="replace")
        if key not in pending:
            continue
        url = pending.pop(key)
        answer = read_answer(message, codec, output_topic)
        if answer.suggestion is not None:
            s = answer.suggestion
            flag = "confident" if s.confident else "not confident"
            print(
                f"{key}: {s.category} {s.score:.3f} ({flag}) in {s.timings.total_ms:.0f} ms"
                f"  <- {url}"
            )
        elif answer.dead_letter is not None:
            info = answer.dead_letter
            print(f"{key}: DLQ stage={info.stage} reason={info.reason}: {info.message}  <- {url}")
    for key, url in pending.items():
        print(f"{key}: no answer within {wait_s:.0f} s  <- {url}")
    return not pending


def _cycle(urls: list[str], count: int) -> Iterator[str]:
    for i in range(count):
        yield urls[i % len(urls)]
