"""A second, secured Kafka broker for the security tests, with a CA made by the test.

Listeners, all on localhost:
- SASL_SSL: SCRAM-SHA-512 over TLS (server certificate from the test CA);
- SSL: mutual TLS, a client certificate from the test CA is required;
- PLAINTEXT: the test's own admin and reader (creating SCRAM users and topics, reading the
  answers); the service is never pointed at it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka.admin import (
    AdminClient,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialUpsertion,
)

from devstack.kafka import KafkaBroker
from devstack.process import StackError, free_port
from tests.integration.security.certs import Pki, make_pki

SCRAM_USER = "category-suggester"
SCRAM_PASSWORD = "scram-secret-for-tests"


@dataclass(frozen=True)
class SecureKafka:
    broker: KafkaBroker
    pki: Pki
    plaintext: str  # bootstrap servers of each listener
    sasl_ssl: str
    mtls: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SecureKafka]:
    port, controller, sasl_port, mtls_port = (free_port() for _ in range(4))
    listeners = {
        "PLAINTEXT": port,
        "SASL_SSL": sasl_port,
        "SSL": mtls_port,
    }
    broker = KafkaBroker(
        Path(tmp_path_factory.mktemp("secure-kafka")),
        port=port,
        controller_port=controller,
        extra_properties={
            "listeners": ",".join(
                [f"{name}://localhost:{p}" for name, p in listeners.items()]
                + [f"CONTROLLER://localhost:{controller}"]
            ),
            "advertised.listeners": ",".join(
                f"{name}://localhost:{p}" for name, p in listeners.items()
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL"
            ),
            "sasl.enabled.mechanisms": "SCRAM-SHA-512",
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(pki.server_keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(pki.ca),
            "listener.name.ssl.ssl.client.auth": "required",
        },
    )
    try:
        broker.start()
    except StackError as exc:
        pytest.fail(f"the secured Kafka broker could not start: {exc}", pytrace=False)
    try:
        _add_scram_user(broker.bootstrap_servers, SCRAM_USER, SCRAM_PASSWORD)
        yield SecureKafka(
            broker,
            pki,
            plaintext=broker.bootstrap_servers,
            sasl_ssl=f"localhost:{sasl_port}",
            mtls=f"localhost:{mtls_port}",
        )
    finally:
        broker.stop()


def _add_scram_user(bootstrap: str, user: str, password: str) -> None:
    """Create a SCRAM-SHA-512 credential through the admin API (KRaft stores it)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    upsert = UserScramCredentialUpsertion(
        user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), password.encode()
    )
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=30)
