"""The service's configuration: one frozen model, read once from the environment.

Every setting has its default here and nowhere else; defaults match the local stack
(`make stack`). Environment variables use the prefix `SUGGESTER_` and `__` for nesting,
for example `SUGGESTER_KAFKA__BOOTSTRAP_SERVERS` or `SUGGESTER_TRITON__URL`. Nothing else
in the package reads `os.environ`.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DeliveryMode(enum.StrEnum):
    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


class SecurityProtocol(enum.StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class KafkaSettings(_Section):
    bootstrap_servers: str = "localhost:9092"
    input_topic: str = "listing-image-uploaded"
    output_topic: str = "category-suggestion"
    dlq_topic: str = "listing-image-uploaded.dlq"
    group_id: str = "category-suggester"
    # Static membership (group.instance.id): set from the pod name in Kubernetes so a
    # restart within session_timeout_ms does not trigger a rebalance.
    group_instance_id: str | None = None
    client_id: str = "category-suggester"
    session_timeout_ms: int = Field(default=45_000, ge=6_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    statistics_interval_ms: int = Field(default=5_000, ge=0)
    security_protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    ssl_certificate_location: str | None = None
    ssl_key_location: str | None = None
    ssl_key_password: SecretStr | None = None
    # Exactly-once delivery only. The producer's transactional.id; unset: derived from the
    # group and group_instance_id (stable across restarts, so a restarted pod fences its
    # predecessor and aborts its open transaction at once), or random per process without
    # static membership (a crashed process's open transaction then holds its partitions
    # until transaction_timeout_ms ends it).
    transactional_id: str | None = None
    transaction_timeout_ms: int = Field(default=10_000, ge=1_000)
    # Largest record the producers send (librdkafka's message.max.bytes, before
    # compression): room for the largest accepted event plus the DLQ headers. A DLQ record
    # over it, or one the broker refuses as too large (the topic's max.message.bytes
    # applies after compression), is sent without the original value (header
    # dlq.value.omitted gives its size) rather than stall the partition.
    max_record_bytes: int = Field(default=2 * 1024 * 1024, ge=1000)
    # Backoff between tries of a publish, a transaction, a producer replacement and a
    # rewind after a broker fault (category_suggester/retry.py).
    retry_backoff_base_s: float = Field(default=0.2, gt=0)
    retry_backoff_max_s: float = Field(default=5.0, gt=0)
    # Any other librdkafka property, applied last (e.g. {"fetch.min.bytes": "1"}).
    extra: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sasl_needs_credentials(self) -> KafkaSettings:
        if self.security_protocol in (SecurityProtocol.SASL_SSL, SecurityProtocol.SASL_PLAINTEXT):
            if not self.sasl_mechanism:
                raise ValueError(
                    f"kafka.security_protocol={self.security_protocol.value} needs "
                    "kafka.sasl_mechanism (e.g. SCRAM-SHA-512)"
                )
            if self.sasl_mechanism.upper() != "GSSAPI" and (
                self.sasl_username is None or self.sasl_password is None
            ):
                raise ValueError("SASL needs kafka.sasl_username and kafka.sasl_password")
        return self

    def common_config(self) -> dict[str, Any]:
        """librdkafka properties shared by the consumer, the producers and the admin client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.value,
        }
        optional: dict[str, str | SecretStr | None] = {
            "sasl.mechanism": self.sasl_mechanism,
            "sasl.username": self.sasl_username,
            "sasl.password": self.sasl_password,
            "ssl.ca.location": self.ssl_ca_location,
            "ssl.certificate.location": self.ssl_certificate_location,
            "ssl.key.location": self.ssl_key_location,
            "ssl.key.password": self.ssl_key_password,
        }
        for key, value in optional.items():
            if value is None:
                continue
            conf[key] = value.get_secret_value() if isinstance(value, SecretStr) else value
        return conf


class RegistrySettings(_Section):
    # Empty: no Schema Registry; events use Avro single-object encoding instead.
    url: str | None = None
    basic_auth_user_info: SecretStr | None = None


class FetchSettings(_Section):
    # Schemes accepted in image_url; anything else is refused before any connection.
    allowed_schemes: tuple[str, ...] = ("http", "https", "s3")
    # Hosts (host or host:port) allowed even when they resolve to private addresses.
    allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # When non-empty, only these hosts (or their subdomains) may be fetched at all.
    host_allowlist: Annotated[tuple[str, ...], NoDecode] = ()
    max_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    max_url_length: int = Field(default=2048, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    read_timeout_s: float = Field(default=5.0, gt=0)
    total_timeout_s: float = Field(default=10.0, gt=0)
    max_redirects: int = Field(default=3, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    backoff_base_s: float = Field(default=0.1, gt=0)
    backoff_max_s: float = Field(default=2.0, gt=0)
    max_connections: int = Field(default=64, gt=0)
    concurrency: int = Field(default=64, gt=0)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_ports(cls, value: Any) -> Any:
        return _host_list(value, with_port=True)

    @field_validator("host_allowlist", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        return _host_list(value, with_port=False)


# A host-list entry: a DNS name or IPv4 address, or an IPv6 address in brackets, with an
# optional port where ports are allowed.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9a-f:.]+\])"
_HOST_ENTRY = re.compile(_HOST)
_JSON_LIST = re.compile(r"\[\s*[\"\]]")
_HOST_PORT_ENTRY = re.compile(rf"{_HOST}(?::(?P<port>[0-9]{{1,5}}))?")


def _host_list(value: Any, *, with_port: bool) -> Any:
    """A list of hosts from the environment: comma-separated, or a JSON list of strings.

    Each entry is lower-cased and must have the shape of a host (`host:port` too when
    `with_port`); a malformed one raises ValueError, so the service stops at start naming
    the variable instead of refusing every fetch from a host it was meant to allow.
    """
    if isinstance(value, str):
        text = value.strip()
        if _JSON_LIST.match(text):  # `[::1]:8090` is an entry, `["::1"]` a JSON list
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON list of hosts: {exc}") from None
        else:
            value = text.split(",")
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a comma-separated list or a JSON list of strings")
    entries = tuple(v.strip().lower() for v in value if v.strip())
    shape = _HOST_PORT_ENTRY if with_port else _HOST_ENTRY
    for entry in entries:
        match = shape.fullmatch(entry)
        port = match.group("port") if match and with_port else None
        if match is None or (port is not None and not 0 < int(port) < 65536):
            wanted = "host, host:port, [v6] or [v6]:port" if with_port else "a host name"
            raise ValueError(f"{entry!r} is not {wanted}")
    return entries


class DecodeSettings(_Section):
    threads: int = Field(default=2, gt=0)
    # Decompression-bomb limits, in pixels; larger images are refused before decoding.
    # JPEG is decoded at reduced scale (draft mode), so a 40 MP photo costs little memory;
    # PNG and WebP are decoded whole (~4-5 bytes a pixel at least, ~800 MB for a 40 MP
    # RGBA WebP), hence their lower limit.
    max_pixels: int = Field(default=40_000_000, gt=0)
    max_pixels_lossless: int = Field(default=16_000_000, gt=0)
    queue_size: int = Field(default=128, gt=0)


class TritonSettings(_Section):
    url: str = "localhost:8001"
    model_name: str = "category_classifier"
    model_version: str = ""
    # Largest batch sent; capped at start-up by the model's max_batch_size.
    max_batch_size: int = Field(default=32, gt=0)
    max_batch_wait_ms: float = Field(default=5.0, ge=0)
    max_inflight_batches: int = Field(default=4, gt=0)
    request_timeout_s: float = Field(default=10.0, gt=0)
    ready_timeout_s: float = Field(default=60.0, gt=0)
    retry_backoff_base_s: float = Field(default=0.2, gt=0)
    retry_backoff_max_s: float = Field(default=5.0, gt=0)


class PostprocessSettings(_Section):
    confidence_threshold: float = Field(default=0.5, ge=0, le=1)


class ConsumerSettings(_Section):
    # Pause all partitions at this many in-flight events, resume at the low mark.
    max_inflight: int = Field(default=512, gt=0)
    resume_inflight: int = Field(default=256, ge=0)
    poll_batch: int = Field(default=256, gt=0)
    commit_interval_s: float = Field(default=1.0, gt=0)
    # Exactly-once delivery only: results are committed in one transaction this often.
    transaction_interval_s: float = Field(default=0.1, gt=0)
    shutdown_grace_s: float = Field(default=20.0, ge=0)

    @model_validator(mode="after")
    def _marks_ordered(self) -> ConsumerSettings:
        if self.resume_inflight >= self.max_inflight:
            raise ValueError("consumer.resume_inflight must be below consumer.max_inflight")
        return self


class ObservabilitySettings(_Section):
    host: str = "0.0.0.0"  # noqa: S104  (served to Prometheus and kubelet probes)
    port: int = Field(default=9108, ge=0, le=65535)
    log_level: str = "INFO"


class WebSettings(_Section):
    """The try-a-photo page (`python -m category_suggester web`), a tool beside the service."""

    # Localhost by default: the page publishes events to the service's input topic.
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Where the service fetches stored uploads from (host:port, served by the page's own
    # app under /uploads/); it must be in fetch.allowed_hosts. Unset: host:port above,
    # 127.0.0.1 when bound to every interface.
    upload_origin: str | None = None
    # Unset: a temporary folder, removed on exit. Uploads are deleted once answered and
    # in any case after upload_ttl_s.
    upload_dir: str | None = None
    upload_ttl_s: float = Field(default=600.0, gt=0)
    # How long the page waits for the service's answer before it says what is missing.
    answer_timeout_s: float = Field(default=30.0, gt=0)
    # The service's readiness probe, asked when no answer comes. Unset: observability's
    # port on 127.0.0.1.
    service_url: str | None = None


class Settings(BaseSettings):
    """All settings of the service."""

    model_config = SettingsConfigDict(
        env_prefix="SUGGESTER_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    delivery: DeliveryMode = DeliveryMode.AT_LEAST_ONCE
    kafka: KafkaSettings = KafkaSettings()
    registry: RegistrySettings = RegistrySettings()
    fetch: FetchSettings = FetchSettings()
    decode: DecodeSettings = DecodeSettings()
    triton: TritonSettings = TritonSettings()
    postprocess: PostprocessSettings = PostprocessSettings()
    consumer: ConsumerSettings = ConsumerSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    web: WebSettings = WebSettings()
