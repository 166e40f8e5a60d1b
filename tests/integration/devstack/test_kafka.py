"""The local broker: it starts, carries messages, and keeps them across a restart."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer

from devstack.kafka import KafkaBroker, free_port


def _two_free_ports() -> tuple[int, int]:
    port = free_port()
    controller_port = free_port()
    while controller_port == port:
        controller_port = free_port()
    return port, controller_port


def _produce(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    delivered: list[KafkaError | None] = []
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    producer.produce(
        topic, key=key, value=value, on_delivery=lambda err, _msg: delivered.append(err)
    )
    assert producer.flush(30) == 0
    assert delivered == [None]


def _consume_one(bootstrap: str, topic: str, timeout_s: float = 30) -> Message:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"pytest_{topic}_{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            return msg
        pytest.fail(f"no message on {topic} within {timeout_s}s")
    finally:
        consumer.close()


@pytest.mark.integration
def test_message_survives_broker_restart(tmp_path: Path) -> None:
    port, controller_port = _two_free_ports()
    state_dir = tmp_path / "kafka"
    broker = KafkaBroker(state_dir, port=port, controller_port=controller_port, heap="256m")
    topic = f"pytest_restart_{uuid.uuid4().hex[:8]}"
    try:
        broker.start()
        assert broker.is_running()
        broker.create_topics({topic: 2})
        broker.create_topics({topic: 2})  # idempotent
        _produce(broker.bootstrap_servers, topic, b"listing-1", b"hello")

        # Stopped through the pid file, as `make stack-down` would from another process.
        KafkaBroker(state_dir, port=port, controller_port=controller_port).stop()
        assert not broker.is_running()

        broker.start()
        msg = _consume_one(broker.bootstrap_servers, topic)
        assert (msg.key(), msg.value()) == (b"listing-1", b"hello")
    finally:
        broker.stop()
    assert not broker.is_running()
    assert not (state_dir / "kafka.pid").exists()
