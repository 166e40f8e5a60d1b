"""The Grafana dashboard: Grafana's data model accepts it, its layout and data source are
sound, and every query parses as PromQL and names metrics that exist.

Grafana itself cannot run here. Its data model comes from grafana-foundation-sdk (Grafana
Labs' types generated from Grafana's schemas): the dashboard is loaded into those types
and written back, and nothing may be lost on the way, so a misspelt or unknown field of a
dashboard, panel, target or panel option fails. The queries run against a live Prometheus
in tests/integration/deploy/test_dashboard_queries.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from prometheus_client import CollectorRegistry

from category_suggester.metrics import Metrics

REPO_ROOT = Path(__file__).resolve().parents[3]
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "category-suggester.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
GRID_COLUMNS = 24
# Grafana's built-in variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}
TRITON_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
}
METRIC_NAME = re.compile(r"\b(?:suggester_|nv_)[a-z0-9_]+\b|\bup\b")

Panel = dict[str, Any]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[Panel]:
    """Every panel, rows and the panels inside collapsed rows included."""
    found: list[Panel] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def _query_panels(dashboard: dict[str, Any]) -> list[Panel]:
    return [p for p in _panels(dashboard) if p["type"] != "row"]


def _service_metric_names() -> set[str]:
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        if family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "info":
            names.add(f"{family.name}_info")
        else:
            names.add(family.name)
    return names


def _lost_in_round_trip(original: Any, written: Any, path: str = "") -> list[str]:
    if isinstance(original, dict):
        lost = []
        for key, value in original.items():
            if key not in written:
                lost.append(f"{path}/{key}")
            else:
                lost += _lost_in_round_trip(value, written[key], f"{path}/{key}")
        return lost
    if isinstance(original, list):
        assert len(original) == len(written), path
        return [
            item
            for i, (a, b) in enumerate(zip(original, written, strict=True))
            for item in _lost_in_round_trip(a, b, f"{path}[{i}]")
        ]
    return [] if original == written else [f"{path}: {original!r} became {written!r}"]


def test_grafana_data_model_keeps_every_field(dashboard: dict[str, Any]) -> None:
    plugins.register_default_plugins()
    model = Dashboard.from_json(dashboard)
    written = json.loads(json.dumps(model, default=lambda o: o.to_json()))
    assert _lost_in_round_trip(dashboard, written) == []
    assert {p["type"] for p in _panels(dashboard)} <= {"row", "timeseries", "stat"}


def test_identity_and_layout(dashboard: dict[str, Any]) -> None:
    assert re.fullmatch(r"[a-zA-Z0-9_-]{8,40}", dashboard["uid"])
    assert dashboard["schemaVersion"] >= 36
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0
        assert grid["h"] > 0
        assert grid["x"] >= 0
        assert grid["y"] >= 0
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]


def test_every_query_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (prometheus,) = [d for d in provisioned if d["type"] == "prometheus"]
    expected = {"type": "prometheus", "uid": prometheus["uid"]}
    for panel in _query_panels(dashboard):
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert target["expr"].strip(), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what it shows"


def test_queries_parse_as_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule; a syntax error fails."""
    rules = []
    for panel in _query_panels(dashboard):
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            rules.append({"record": f"panel_{panel['id']}_{target['refId']}", "expr": expr})
    rules_file = tmp_path / "dashboard.rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_queries_name_only_metrics_that_exist(dashboard: dict[str, Any]) -> None:
    known = _service_metric_names() | TRITON_METRICS | {"up"}
    for panel in _query_panels(dashboard):
        for target in panel["targets"]:
            unknown = set(METRIC_NAME.findall(target["expr"])) - known
            assert not unknown, f"{panel['title']}: unknown metrics {sorted(unknown)}"


def test_required_views_are_present(dashboard: dict[str, Any]) -> None:
    exprs = "\n".join(t["expr"] for p in _query_panels(dashboard) for t in p["targets"])
    for quantile in ("0.50", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (le) "
            "(rate(suggester_end_to_end_latency_seconds_bucket" in exprs
        )
    required = [
        "sum by (le, stage) (rate(suggester_stage_latency_seconds_bucket",
        "sum by (outcome) (rate(suggester_events_total",
        "sum by (stage, reason) (rate(suggester_dlq_total",
        "suggester_inflight_events",
        "max by (topic, partition) (suggester_consumer_lag)",
        "suggester_batch_size_bucket",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "sum(rate(nv_inference_count",
        "sum(rate(nv_inference_exec_count",
        "nv_gpu_utilization",
    ]
    for fragment in required:
        assert fragment in exprs, fragment
