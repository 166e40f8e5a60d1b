"""The service against a secured broker: SASL/SCRAM over TLS, and mutual TLS.

Configured only through settings (SUGGESTER_KAFKA__*), the service consumes, classifies and
publishes over the secured listener; with a wrong password or an untrusted certificate it
consumes nothing, never becomes ready, and its log names the cause.
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from category_suggester.events import EventCodec
from category_suggester.settings import KafkaSettings
from tests.conftest import ServiceFactory, Topics
from tests.corpus.images import encode, picture
from tests.integration.security.certs import CLIENT_KEY_PASSWORD, Pki
from tests.integration.security.conftest import SCRAM_PASSWORD, SCRAM_USER, SecureKafka
from tests.support.kafka import make_event, produce_events, read_answers
from tests.support.origin import ImageOrigin
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.integration

CODEC = EventCodec()
EVENTS = 12


def sasl_ssl_env(kafka: SecureKafka, password: str = SCRAM_PASSWORD) -> dict[str, str]:
    return {
        "SUGGESTER_KAFKA__BOOTSTRAP_SERVERS": kafka.sasl_ssl,
        "SUGGESTER_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "SUGGESTER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "SUGGESTER_KAFKA__SASL_USERNAME": SCRAM_USER,
        "SUGGESTER_KAFKA__SASL_PASSWORD": password,
        "SUGGESTER_KAFKA__SSL_CA_LOCATION": str(kafka.pki.ca),
    }


def mtls_env(kafka: SecureKafka, *, stranger: bool = False) -> dict[str, str]:
    pki: Pki = kafka.pki
    env = {
        "SUGGESTER_KAFKA__BOOTSTRAP_SERVERS": kafka.mtls,
        "SUGGESTER_KAFKA__SECURITY_PROTOCOL": "SSL",
        "SUGGESTER_KAFKA__SSL_CA_LOCATION": str(pki.ca),
    }
    if stranger:
        env["SUGGESTER_KAFKA__SSL_CERTIFICATE_LOCATION"] = str(pki.stranger_cert)
        env["SUGGESTER_KAFKA__SSL_KEY_LOCATION"] = str(pki.stranger_key)
    else:
        env["SUGGESTER_KAFKA__SSL_CERTIFICATE_LOCATION"] = str(pki.client_cert)
        env["SUGGESTER_KAFKA__SSL_KEY_LOCATION"] = str(pki.client_key)
        env["SUGGESTER_KAFKA__SSL_KEY_PASSWORD"] = CLIENT_KEY_PASSWORD
    return env


def client_config(env: dict[str, str]) -> dict[str, object]:
    """librdkafka properties for the same settings, through KafkaSettings.common_config."""
    prefix = "SUGGESTER_KAFKA__"
    settings = KafkaSettings.model_validate(
        {k.removeprefix(prefix).lower(): v for k, v in env.items() if k.startswith(prefix)}
    )
    return settings.common_config()


def run_events_through(
    kafka: SecureKafka,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    env: dict[str, str],
) -> ServiceProcess:
    kafka.broker.create_topics({topics.input: 3, topics.output: 3, topics.dlq: 1})
    url = image_origin.add("security/photo.jpg", encode(picture(21), "JPEG"))
    service = start_service(**env)
    service.wait_ready()
    # The test's producer authenticates the same way (its settings, its listener).
    producer = Producer(client_config(env) | {"enable.idempotence": True})
    events = [make_event(url) for _ in range(EVENTS)]
    for event in events:
        producer.produce(
            topics.input, key=event.listing_id.encode(), value=CODEC.encode_uploaded(event)
        )
    assert producer.flush(30) == 0
    answers = read_answers(
        kafka.plaintext, topics.output, topics.dlq, CODEC, expect=EVENTS, timeout_s=60
    )
    assert not answers.dead_letters
    assert set(answers.suggestions) == {str(e.event_id) for e in events}
    return service


def test_service_works_over_sasl_scram_and_tls(
    secure_kafka: SecureKafka,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    env = sasl_ssl_env(secure_kafka)
    service = run_events_through(secure_kafka, topics, image_origin, start_service, env)
    assert service.terminate() == 0


def test_service_works_over_mutual_tls(
    secure_kafka: SecureKafka,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    env = mtls_env(secure_kafka)
    service = run_events_through(secure_kafka, topics, image_origin, start_service, env)
    assert service.terminate() == 0


def wait_for(condition: Callable[[], bool], timeout_s: float) -> bool:
    """Poll `condition` until it holds or `timeout_s` passes; whether it held."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)  # polling a condition, not synchronising on time
    return condition()


def bad_env(kafka: SecureKafka, case: str) -> dict[str, str]:
    if case == "wrong-password":
        return sasl_ssl_env(kafka, password="not-the-password")
    if case == "wrong-mechanism":
        return sasl_ssl_env(kafka) | {"SUGGESTER_KAFKA__SASL_MECHANISM": "SCRAM-SHA-256"}
    if case == "unknown-broker-ca":
        # The system's CAs, not the test CA that signed the broker's certificate.
        return sasl_ssl_env(kafka) | {"SUGGESTER_KAFKA__SSL_CA_LOCATION": "probe"}
    if case == "untrusted-client-certificate":
        return mtls_env(kafka, stranger=True)
    if case == "no-client-certificate":
        return {k: v for k, v in mtls_env(kafka).items() if "CERT" not in k and "KEY" not in k}
    raise ValueError(case)


# What librdkafka says, in the service's log, for each misconfiguration.
BAD_CREDENTIALS = {
    "wrong-password": "SASL authentication error",
    "wrong-mechanism": "Unsupported SASL mechanism",
    "unknown-broker-ca": "certificate verify failed",
    "untrusted-client-certificate": "bad certificate",
    "no-client-certificate": "bad certificate",
}


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
def test_bad_credentials_consume_nothing_and_say_why(
    case: str,
    secure_kafka: SecureKafka,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
) -> None:
    secure_kafka.broker.create_topics({topics.input: 3, topics.output: 3, topics.dlq: 1})
    url = image_origin.add("security/waiting.jpg", encode(picture(22), "JPEG"))
    produce_events(secure_kafka.plaintext, topics.input, [make_event(url)], CODEC)
    service = start_service(**bad_env(secure_kafka, case))

    cause = BAD_CREDENTIALS[case]
    assert wait_for(lambda: cause in service.log_tail(200), 30), service.log_tail()
    # Either still up and not ready, or stopped with the cause (a refusal no retry can
    # mend stops the service; it may stop between the two looks).
    try:
        ready = service.get("/readyz")[0]
    except (urllib.error.URLError, ConnectionError):
        ready = None
    if ready is None:
        assert wait_for(lambda: service.exit_code() is not None, 30), service.log_tail()
        assert service.exit_code() != 0
    else:
        assert ready == 503
    answers = read_answers(
        secure_kafka.plaintext, topics.output, topics.dlq, CODEC, expect=1, timeout_s=3
    )
    assert answers.count() == 0, "the service worked with bad credentials"


@pytest.mark.parametrize("case", ["wrong-password", "untrusted-client-certificate"])
def test_bad_credentials_stop_the_service_with_the_cause(
    case: str,
    secure_kafka: SecureKafka,
    topics: Topics,
    start_service: ServiceFactory,
) -> None:
    secure_kafka.broker.create_topics({topics.input: 3, topics.output: 3, topics.dlq: 1})
    service = start_service(**bad_env(secure_kafka, case))
    assert wait_for(lambda: service.exit_code() is not None, 25), "still running"
    assert service.exit_code() != 0
    last_words = service.log_tail(3).lower()
    assert "authentication" in last_words or "certificate" in last_words, last_words
