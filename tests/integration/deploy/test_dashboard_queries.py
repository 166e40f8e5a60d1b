"""Every query of the Grafana dashboard, run by a real Prometheus that scrapes the real
service and the real Triton while events flow: none may error, none may come back empty.

Two documented exceptions, each allowed only while the metric behind it has no series
at all (so a misspelt query still fails wherever the metric exists):
- GPU-only panels: Triton exports nv_gpu_* metrics only when it runs on a GPU, and the
  test stack's Triton runs on the CPU. On a GPU they must return data too.
- Retries: a labelled counter has no series before its first increment, and a healthy
  run need not retry anything.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from category_suggester.events import EventCodec
from category_suggester.metrics import Metrics
from devstack.kafka import KafkaBroker
from devstack.process import free_port
from tests.conftest import Topics
from tests.integration.deploy.prometheus_server import PrometheusError, PrometheusFactory
from tests.support.images import photo
from tests.support.kafka import make_event, produce_events, read_answers
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration

DASHBOARD = (
    Path(__file__).resolve().parents[3]
    / "deploy"
    / "grafana"
    / "dashboards"
    / "category-suggester.json"
)
# Grafana's built-in variables at the test's time scale: Prometheus scrapes every second.
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$__range": "10m", "$__interval": "1s"}
# Panel title -> a selector that must have no series at all for the panel to be empty.
MAY_BE_EMPTY = {
    "GPU utilisation": '{__name__=~"nv_gpu_.*"}',
    "GPU memory used": '{__name__=~"nv_gpu_.*"}',
    "Retries by stage": "suggester_retries_total",
}
GOOD_IMAGES = 24


def _panel_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression with Grafana's variables replaced) for every query."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    queries = []
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            queries.append((panel["title"], target["refId"], expr))
    return queries


def _host_port(url: str) -> str:
    return urlsplit(url).netloc


def test_prometheus_fixture_scrapes_an_exporter(prometheus: PrometheusFactory) -> None:
    """The fixture itself: a scrape of a prometheus_client exporter becomes queryable."""
    metrics = Metrics(CollectorRegistry())
    metrics.events.labels(outcome="suggested").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.registry)
    try:
        prom = prometheus({"category-suggester": [f"127.0.0.1:{port}"]})
        result = prom.wait_for('suggester_events_total{outcome="suggested"} == 3')
        assert result[0]["metric"]["job"] == "category-suggester"
        assert prom.query('up{job="category-suggester"}')[0]["value"][1] == "1"
        with pytest.raises(PrometheusError, match="parse error"):
            prom.query("sum(")
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def test_every_panel_query_returns_series(
    prometheus: PrometheusFactory,
    running_service_metrics_url: str,
    triton_metrics_url: str,
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
) -> None:
    prom = prometheus(
        {
            "category-suggester": [_host_port(running_service_metrics_url)],
            "triton": [_host_port(triton_metrics_url)],
        }
    )
    prom.wait_for('up{job="category-suggester"} == 1')
    prom.wait_for('up{job="triton"} == 1')

    # Good photos, plus events that end in the dead-letter topic: a missing image and
    # one whose origin keeps failing (retried, then dead-lettered).
    run = uuid.uuid4().hex[:8]
    urls = [image_origin.add(f"dash-{run}-{i}.jpg", photo(i)) for i in range(GOOD_IMAGES)]
    urls += [image_origin.url(f"dash-{run}-missing.jpg"), image_origin.url("_/status/503")]
    codec = EventCodec()
    produce_events(kafka.bootstrap_servers, topics.input, [make_event(u) for u in urls], codec)
    answers = read_answers(
        kafka.bootstrap_servers, topics.output, topics.dlq, codec, expect=len(urls)
    )
    assert answers.count() >= len(urls)

    # Prometheus has scraped both after every event was answered.
    prom.wait_for(f'sum(suggester_events_total{{job="category-suggester"}}) >= {len(urls)}')
    prom.wait_for('sum(nv_inference_exec_count{job="triton"}) > 0')
    # Lag comes from librdkafka's statistics, every few seconds.
    prom.wait_for('suggester_consumer_lag{job="category-suggester"}')

    empty = []
    for title, ref_id, expr in _panel_queries():
        if prom.query(expr):
            continue
        if title in MAY_BE_EMPTY and not prom.query(MAY_BE_EMPTY[title]):
            continue
        empty.append(f"{title} [{ref_id}]: {expr}")
    assert not empty, "queries with no series:\n" + "\n".join(empty)
