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
    try:
        producer.produce(
            topic, key=key, value=value, on_delivery=lambda err, _msg: delivered.append(err)
        )
        assert producer.flush(30) == 0
    finally:
        producer.close()
    assert delivered == [None]


def _consume_one(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted", timeout_s: float = 30
) -> Message:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"pytest_{topic}_{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation_level,
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


@pytest.mark.integration
def test_transactions_work_and_data_survives_a_crash(tmp_path: Path) -> None:
    port, controller_port = _two_free_ports()
    broker = KafkaBroker(
        tmp_path / "kafka", port=port, controller_port=controller_port, heap="256m"
    )
    topic = f"pytest_txn_{uuid.uuid4().hex[:8]}"
    try:
        broker.start()
        broker.create_topics({topic: 1})
        # One node carries transactions: the state log has one replica and min ISR 1.
        producer = Producer(
            {"bootstrap.servers": broker.bootstrap_servers, "transactional.id": topic}
        )
        try:
            producer.init_transactions(30)
            producer.begin_transaction()
            producer.produce(topic, key=b"listing-2", value=b"committed")
            producer.commit_transaction(30)
        finally:
            producer.close()
        msg = _consume_one(broker.bootstrap_servers, topic, isolation_level="read_committed")
        assert (msg.key(), msg.value()) == (b"listing-2", b"committed")

        broker.kill()
        assert not broker.is_running()
        broker.start()

        # read_uncommitted: after a crash the coordinator may take tens of seconds to
        # settle transactions; here only the durability of the acknowledged write counts.
        msg = _consume_one(broker.bootstrap_servers, topic)
        assert (msg.key(), msg.value()) == (b"listing-2", b"committed")
    finally:
        broker.stop()
