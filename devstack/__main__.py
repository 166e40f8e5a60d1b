"""`python -m devstack up | down | status`: the local stack behind `make stack` and `make run`.

up: Kafka on localhost:9092 (topics created), Triton on 8000 (HTTP), 8001 (gRPC) and
8002 (metrics) serving model_repository/cpu. When it has no model version yet, the zero-shot
cold-start model (training/zero_shot.py) is built first, about a minute the first time.
Servers run detached; their state and logs live in .stack/ until `down` removes it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from devstack.kafka import KafkaBroker
from devstack.process import StackError
from devstack.triton import TritonServer

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = REPO_ROOT / ".stack"
CPU_REPOSITORY = REPO_ROOT / "model_repository" / "cpu"

# The service's default topics (category_suggester/settings.py) and their partition counts:
# partitions bound how many consumer processes can share the work.
TOPICS = {
    "listing-image-uploaded": 6,
    "category-suggestion": 6,
    "listing-image-uploaded.dlq": 3,
}


def _kafka() -> KafkaBroker:
    return KafkaBroker(STATE_DIR / "kafka", port=9092, controller_port=9093)


def _triton() -> TritonServer:
    return TritonServer(
        CPU_REPOSITORY, STATE_DIR / "triton", http_port=8000, grpc_port=8001, metrics_port=8002
    )


def up() -> None:
    started = time.monotonic()
    kafka = _kafka()
    if kafka.is_running():
        print(f"kafka: already running on {kafka.bootstrap_servers}")
    else:
        print("kafka: starting (first run resolves the broker's jars from Maven Central)")
        kafka.start()
    kafka.create_topics(TOPICS)
    print(f"kafka: ready on {kafka.bootstrap_servers}; topics {', '.join(TOPICS)}")

    from training.repository import bootstrap, served_description

    served = bootstrap(REPO_ROOT / "model_repository")
    description = served_description(REPO_ROOT / "model_repository", "cpu")
    print(f"model: version {served['cpu']}: {description or 'no description in its config'}")

    triton = _triton()
    if triton.is_running():
        print(f"triton: already running (HTTP {triton.http_url}, gRPC {triton.grpc_url})")
    else:
        print("triton: starting")
        triton.start()
    print(
        f"triton: ready; HTTP {triton.http_url}, gRPC {triton.grpc_url}, "
        f"metrics {triton.metrics_url}"
    )
    print(f"stack ready in {time.monotonic() - started:.0f} s; state and logs in {STATE_DIR}")


def down() -> None:
    for name, server in (("triton", _triton()), ("kafka", _kafka())):
        if server.is_running():
            server.stop()
            print(f"{name}: stopped")
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    print(f"removed {STATE_DIR}")


def status() -> int:
    running = 0
    for name, server in (("kafka", _kafka()), ("triton", _triton())):
        state = "running" if server.is_running() else "stopped"
        running += state == "running"
        print(f"{name}: {state}")
    return 0 if running == 2 else 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args()
    try:
        if args.command == "up":
            up()
        elif args.command == "down":
            down()
        else:
            sys.exit(status())
    except StackError as exc:
        sys.exit(f"local stack: {exc}")


if __name__ == "__main__":
    main()
