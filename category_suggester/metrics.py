"""Every Prometheus metric the service exports, built against a registry it is given.

Names carry the `suggester_` prefix and base units; labels come from small fixed sets
(stage, outcome, reason, partition) and never hold an id, a URL or an error text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

# Seconds; fine at the low end where a healthy service lives, wide enough for outages.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)

STAGES = ("fetch", "decode", "queue", "infer", "publish")
OUTCOMES = ("suggested", "dead_lettered")


class Metrics:
    """The service's metrics. One instance per process, given to every step that reports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.end_to_end_latency = Histogram(
            "suggester_end_to_end_latency_seconds",
            "Time from the event's uploaded_at to its suggestion being acknowledged by Kafka.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.stage_latency = Histogram(
            "suggester_stage_latency_seconds",
            "Time spent in one pipeline stage per event (queue: waiting for a batch slot).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "suggester_batch_size",
            "Images per inference request sent to Triton.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "suggester_events_total",
            "Input events finished, by outcome (suggested or dead_lettered).",
            ["outcome"],
            registry=registry,
        )
        self.suggestions = Counter(
            "suggester_suggestions_total",
            "Suggestions published, by whether the top score passed the threshold.",
            ["confident"],
            registry=registry,
        )
        self.dlq = Counter(
            "suggester_dlq_total",
            "Events sent to the dead-letter topic, by stage and reason.",
            ["stage", "reason"],
            registry=registry,
        )
        self.retries = Counter(
            "suggester_retries_total",
            "Retried calls to a dependency, by stage (fetch, infer, publish).",
            ["stage"],
            registry=registry,
        )
        self.inflight = Gauge(
            "suggester_inflight_events",
            "Events consumed but not yet finished (suggested or dead-lettered).",
            registry=registry,
        )
        self.paused_partitions = Gauge(
            "suggester_paused_partitions",
            "Assigned partitions currently paused for back-pressure or an outage.",
            registry=registry,
        )
        self.assigned_partitions = Gauge(
            "suggester_assigned_partitions",
            "Partitions of the input topic assigned to this process.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "suggester_consumer_lag",
            "Messages between the committed offset and the partition's high watermark.",
            ["topic", "partition"],
            registry=registry,
        )
        self.model_ready = Gauge(
            "suggester_model_ready",
            "1 when the last readiness check of the Triton model succeeded, else 0.",
            registry=registry,
        )
        self.last_poll = Gauge(
            "suggester_last_poll_timestamp_seconds",
            "Unix time of the last Kafka poll (the liveness heartbeat).",
            registry=registry,
        )
        self.build_info = Info(
            "suggester_build",
            "Version of the service and the model it serves.",
            registry=registry,
        )
        for stage in STAGES:
            self.stage_latency.labels(stage=stage)
        for outcome in OUTCOMES:
            self.events.labels(outcome=outcome)
        for stage in ("fetch", "infer", "publish"):
            self.retries.labels(stage=stage)
