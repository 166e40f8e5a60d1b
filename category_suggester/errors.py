"""The service's error tree.

Every failure of a step is one of these. Two kinds matter to the pipeline:

- `BadInputError`: the event itself is at fault (undecodable bytes, a refused URL, a file
  that is not an image). Retrying will not help; the event goes to the dead-letter topic
  with `reason` (a short, bounded label used in metrics and DLQ headers) and `stage`.
- `InfrastructureError`: something we depend on is unwell (Triton, the broker). The event
  is not at fault; the pipeline pauses, retries with backoff and never dead-letters it.

`retryable` says whether the same call may succeed if tried again (a timeout, a 503). Only
an `InfrastructureError` can be: a step that raises `BadInputError` has spent its own
retries first (the fetch step's; `attempts` says how many it made).

    SuggesterError
    ├── BadInputError
    │   ├── EventDecodeError          stage=decode_event
    │   ├── FetchRefusedError         stage=fetch (policy: scheme, host, address, size, type)
    │   ├── FetchFailedError          stage=fetch (the origin failed: 404, timeouts after retries)
    │   └── ImageDecodeError          stage=decode (not an image, truncated, bomb)
    └── InfrastructureError
        ├── InferenceUnavailableError stage=infer
        ├── ModelContractError        stage=startup (the served model breaks the contract)
        ├── PublishError              stage=publish
        │   ├── RecordTooLargeError   the broker refuses the record's size (not retried)
        │   ├── PublishFatalError     the producer cannot go on (fenced repeatedly): stop
        │   └── ProducerFailedError   a transactional producer broke: replace it, rewind
        ├── KafkaRefusedError         stage=kafka (bad credentials, untrusted certificate): stop
        └── RegistryError             stage=registry (unreachable; or it refused our schema)
"""

from __future__ import annotations


class SuggesterError(Exception):
    """Base of every error the service raises on purpose."""

    stage: str = "unknown"
    retryable: bool = False

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason

    default_reason: str = "error"


class BadInputError(SuggesterError):
    """The event is at fault; it goes to the dead-letter topic.

    `attempts`: how many times the step that raised it tried (its `dlq.attempts`): the
    fetch step retries an origin's transient failures; a step that does not retry tries
    once.
    """

    def __init__(self, message: str, *, reason: str | None = None, attempts: int = 1) -> None:
        super().__init__(message, reason=reason)
        self.attempts = attempts


class EventDecodeError(BadInputError):
    stage = "decode_event"
    default_reason = "event_undecodable"


class FetchRefusedError(BadInputError):
    """The URL or the response breaks the fetch policy; nothing (more) is read."""

    stage = "fetch"
    default_reason = "fetch_refused"


class FetchFailedError(BadInputError):
    """The origin did not deliver the image (after retries where they help; `attempts`)."""

    stage = "fetch"
    default_reason = "fetch_failed"


class ImageDecodeError(BadInputError):
    stage = "decode"
    default_reason = "image_undecodable"


class InfrastructureError(SuggesterError):
    """A dependency is unwell; pause and retry, never dead-letter."""

    retryable = True


class InferenceUnavailableError(InfrastructureError):
    stage = "infer"
    default_reason = "triton_unavailable"


class ModelContractError(InfrastructureError):
    """The served model does not match the contract in DESIGN.md; fail at start-up."""

    stage = "startup"
    default_reason = "model_contract"
    retryable = False


class PublishError(InfrastructureError):
    stage = "publish"
    default_reason = "publish_failed"


class KafkaRefusedError(InfrastructureError):
    """The brokers refuse this client for good (bad credentials, an untrusted certificate):
    retrying with the same settings cannot help, so the service stops and says why."""

    stage = "kafka"
    default_reason = "kafka_refused"
    retryable = False


class RecordTooLargeError(PublishError):
    """The record is over the producer's or the broker's size limit: no retry can send it."""

    default_reason = "record_too_large"
    retryable = False


class PublishFatalError(PublishError):
    """The producer cannot go on: fenced again and again, so another live process holds
    its transactional.id (a single fence is taken for the coordinator ending a timed-out
    transaction: ProducerFailedError). Retrying cannot help; the service stops and a new
    process resumes from the committed offsets."""

    default_reason = "publish_fatal"
    retryable = False


class ProducerFailedError(PublishError):
    """A transactional producer reached a fatal state without being fenced (a broker crash
    can leave its transaction in a state it cannot end). A new producer with the same
    transactional.id settles the old transaction; the pipeline then rewinds to the
    committed offsets, since whether that transaction committed is unknown."""

    default_reason = "producer_failed"


class RegistryError(InfrastructureError):
    """The Schema Registry could not answer (retryable) or refused a request (not retryable).

    An unknown schema id in an input event is not this error: that event is at fault and
    raises `EventDecodeError(reason="schema_unknown")`.
    """

    stage = "registry"
    default_reason = "registry_unavailable"

    def __init__(self, message: str, *, reason: str | None = None, retryable: bool = True):
        super().__init__(message, reason=reason)
        self.retryable = retryable
