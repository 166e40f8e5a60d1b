"""The baseline: the one-at-a-time consumer of the report this project comes from.

`python -m bench.naive --bootstrap B --input T --output O --group G --triton URL`

For each message, in order and alone: decode the event, GET the image (synchronously),
decode and resize it, send ONE inference request for that one image, build the suggestion,
produce it and wait for the broker's acknowledgement, commit the message's offset
synchronously. It is written to be fair, not slow: one HTTP client with keep-alive, one
gRPC channel to Triton, one producer and one consumer for the whole run, the same decoder,
postprocessing, event contract and codec as the service. What it lacks is concurrency:
nothing overlaps, so every event pays the origin's latency, the inference round trip and
two broker round trips in sequence. Runs until SIGTERM or SIGINT; prints the count.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
from confluent_kafka import Consumer, Producer

from category_suggester.events import EventCodec
from category_suggester.postprocess import postprocess, suggestion_record
from category_suggester.preprocess import decode_image

MODEL = "category_classifier"
MAX_PIXELS = 40_000_000
THRESHOLD = 0.5


def _model(triton: grpcclient.InferenceServerClient) -> tuple[int, list[str], str]:
    """Image size S, labels and version of the served model (one classification probe)."""
    metadata = triton.get_model_metadata(MODEL, as_json=True)
    size = int(metadata["inputs"][0]["shape"][1])
    classes = int(metadata["outputs"][0]["shape"][1])
    probe = grpcclient.InferInput("image", [1, size, size, 3], "UINT8")
    probe.set_data_from_numpy(np.zeros((1, size, size, 3), dtype=np.uint8))
    result = triton.infer(
        MODEL,
        [probe],
        outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=classes)],
    )
    labels = [""] * classes
    for entry in result.as_numpy("probabilities")[0]:
        _score, index, label = entry.decode().split(":", 2)
        labels[int(index)] = label
    version = str(result.get_response(as_json=True).get("model_version", ""))
    return size, labels, version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--triton", required=True, help="Triton gRPC host:port")
    args = parser.parse_args(argv)

    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    codec = EventCodec(input_topic=args.input, output_topic=args.output)
    triton = grpcclient.InferenceServerClient(args.triton)
    size, labels, version = _model(triton)
    http = httpx.Client(timeout=10.0)
    producer = Producer({"bootstrap.servers": args.bootstrap, "acks": "all", "linger.ms": 0})
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([args.input])
    done = 0
    try:
        while not stopping:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            event = codec.decode_uploaded(message.value())
            response = http.get(event.image_url)
            response.raise_for_status()
            image = decode_image(response.content, size=size, max_pixels=MAX_PIXELS)
            request = grpcclient.InferInput("image", [1, size, size, 3], "UINT8")
            request.set_data_from_numpy(image[None])
            result = triton.infer(
                MODEL, [request], outputs=[grpcclient.InferRequestedOutput("probabilities")]
            )
            prediction = postprocess(result.as_numpy("probabilities")[0], labels, THRESHOLD)
            suggestion = suggestion_record(
                event,
                prediction,
                threshold=THRESHOLD,
                model_name=MODEL,
                model_version=version,
                fetch_s=0.0,
                preprocess_s=0.0,
                inference_s=0.0,
            )
            producer.produce(
                args.output,
                key=event.listing_id.encode(),
                value=codec.encode_suggestion_record(suggestion),
            )
            producer.flush()
            consumer.commit(message=message, asynchronous=False)
            done += 1
    finally:
        consumer.close()
        http.close()
        triton.close()
    print(f"naive consumer answered {done} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
