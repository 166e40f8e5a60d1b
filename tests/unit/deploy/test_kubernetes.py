"""The Kubernetes manifests: every overlay renders with kustomize and validates.

Core kinds are validated strictly (unknown fields refused) against the Kubernetes
OpenAPI schemas that the PyPI package kubernetes-validate ships. The custom resources
(KEDA ScaledObject and TriggerAuthentication, Prometheus Operator PodMonitor and
ServiceMonitor) have no schema there: they are checked against the structural schemas in
crd_schemas/, written for this repository from those resources' documented APIs.
Then the properties the design depends on are checked across resources.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from category_suggester.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[3]
OVERLAYS_DIR = REPO_ROOT / "deploy" / "k8s" / "overlays"
OVERLAYS = sorted(path.name for path in OVERLAYS_DIR.iterdir() if path.is_dir())
SCHEMAS_DIR = Path(__file__).parent / "crd_schemas"
# The oldest Kubernetes minor the manifests must work on.
KUBERNETES_VERSION = "1.30"
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
CONSUMER = "category-suggester"
TRITON = "triton"
# Time the drain may take on top of the configured grace before SIGKILL is acceptable.
DRAIN_MARGIN_S = 10

Resource = dict[str, Any]


def _render(kubectl: str, overlay: str) -> list[Resource]:
    result = subprocess.run(
        [kubectl, "kustomize", str(OVERLAYS_DIR / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize failed for {overlay}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, kubectl: str) -> list[Resource]:
    return _render(kubectl, request.param)


def _find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _container(deployment: Resource) -> Resource:
    containers: list[Resource] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _consumer_env(resources: list[Resource]) -> dict[str, str]:
    """The SUGGESTER_* variables the consumer container gets from its ConfigMap."""
    container = _container(_find(resources, "Deployment", CONSUMER))
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env |= _find(resources, "ConfigMap", source["configMapRef"]["name"])["data"]
    return env


def _selects(selector: Resource, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are used here"
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def _crd_schema(resource: Resource) -> dict[str, Any]:
    key = (resource["apiVersion"], resource["kind"])
    assert key in CUSTOM_KINDS, f"no schema for custom resource {key}"
    schema: dict[str, Any] = json.loads((SCHEMAS_DIR / CUSTOM_KINDS[key]).read_text())
    return schema


def _is_custom(resource: Resource) -> bool:
    return resource["apiVersion"].split("/")[0].endswith((".sh", ".coreos.com"))


def test_staging_and_production_overlays_exist() -> None:
    assert {"staging", "production"} <= set(OVERLAYS)


def test_core_resources_validate_strictly(rendered: list[Resource]) -> None:
    core = [r for r in rendered if not _is_custom(r)]
    assert {r["kind"] for r in core} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for resource in core:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def test_custom_resources_match_their_schemas(rendered: list[Resource]) -> None:
    custom = [r for r in rendered if _is_custom(r)]
    assert {r["kind"] for r in custom} >= {"ScaledObject", "PodMonitor", "ServiceMonitor"}
    for resource in custom:
        jsonschema.validate(resource, _crd_schema(resource))


def test_validation_refuses_misspelt_and_mistyped_fields(kubectl: str) -> None:
    """The validators are strict enough to catch the mistakes they exist for."""
    resources = _render(kubectl, OVERLAYS[0])
    deployment = copy.deepcopy(_find(resources, "Deployment", CONSUMER))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    scaled = copy.deepcopy(_find(resources, "ScaledObject", CONSUMER))
    scaled["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 500
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, _crd_schema(scaled))

    monitor = copy.deepcopy(_find(resources, "PodMonitor", CONSUMER))
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, _crd_schema(monitor))


def test_consumer_config_is_valid_for_the_service(
    rendered: list[Resource], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = _consumer_env(rendered)
    assert all(key.startswith("SUGGESTER_") for key in env)
    for key in list(os.environ):
        if key.startswith("SUGGESTER_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The pod also gets its name as group.instance.id; any value stands in for it here.
    monkeypatch.setenv("SUGGESTER_KAFKA__GROUP_INSTANCE_ID", "category-suggester-0")
    monkeypatch.setenv("SUGGESTER_KAFKA__SASL_USERNAME", "from-the-secret")
    monkeypatch.setenv("SUGGESTER_KAFKA__SASL_PASSWORD", "from-the-secret")
    settings = Settings()
    triton_service = _find(rendered, "Service", TRITON)
    grpc_port = next(p["port"] for p in triton_service["spec"]["ports"] if p["name"] == "grpc")
    assert settings.triton.url == f"{TRITON}:{grpc_port}"
    assert settings.observability.port == 9108


def test_consumer_deployment_probes_grace_and_static_membership(
    rendered: list[Resource],
) -> None:
    deployment = _find(rendered, "Deployment", CONSUMER)
    pod = deployment["spec"]["template"]["spec"]
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == 9108

    def probe(name: str) -> tuple[str, str]:
        http = container[name]["httpGet"]
        return http["path"], http["port"]

    assert probe("livenessProbe") == ("/healthz", "metrics")
    assert probe("startupProbe") == ("/healthz", "metrics")
    assert probe("readinessProbe") == ("/readyz", "metrics")

    drain_s = float(_consumer_env(rendered)["SUGGESTER_CONSUMER__SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= drain_s + DRAIN_MARGIN_S

    instance_id = next(
        e for e in container["env"] if e["name"] == "SUGGESTER_KAFKA__GROUP_INSTANCE_ID"
    )
    assert instance_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # KEDA owns the replica count; a replicas field would fight it on every apply.
    assert "replicas" not in deployment["spec"]
    assert ":" in container["image"], "images are pinned to a tag"
    assert not container["image"].endswith(":latest")


def test_scaled_object_scales_the_consumer_on_its_own_lag(rendered: list[Resource]) -> None:
    scaled = _find(rendered, "ScaledObject", CONSUMER)
    spec = scaled["spec"]
    partitions = int(scaled["metadata"]["annotations"]["category-suggester/input-partitions"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    assert spec["scaleTargetRef"]["name"] == CONSUMER
    assert spec.get("scaleTargetRef", {}).get("kind", "Deployment") == "Deployment"
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    env = _consumer_env(rendered)
    metadata = trigger["metadata"]
    assert metadata["allowIdleConsumers"] == "false"
    assert metadata["bootstrapServers"] == env["SUGGESTER_KAFKA__BOOTSTRAP_SERVERS"]
    assert metadata["consumerGroup"] == env["SUGGESTER_KAFKA__GROUP_ID"]
    assert metadata["topic"] == env["SUGGESTER_KAFKA__INPUT_TOPIC"]
    if env.get("SUGGESTER_KAFKA__SECURITY_PROTOCOL", "PLAINTEXT") != "PLAINTEXT":
        auth = _find(rendered, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} >= {
            "sasl",
            "username",
            "password",
            "tls",
        }


def test_disruption_budgets_select_their_pods(rendered: list[Resource]) -> None:
    budgets = [r for r in rendered if r["kind"] == "PodDisruptionBudget"]
    consumer_labels = _find(rendered, "Deployment", CONSUMER)["spec"]["template"]["metadata"]
    assert any(_selects(b["spec"]["selector"], consumer_labels["labels"]) for b in budgets)
    for budget in budgets:
        assert any(
            _selects(budget["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
            for d in rendered
            if d["kind"] == "Deployment"
        ), budget["metadata"]["name"]


def test_triton_runs_on_a_gpu_with_probes_for_model_loading(rendered: list[Resource]) -> None:
    deployment = _find(rendered, "Deployment", TRITON)
    container = _container(deployment)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    # Loading the model and building TensorRT engines may take minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--metrics-port=8002" in container["args"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "http": 8000,
        "grpc": 8001,
        "metrics": 8002,
    }


def test_services_and_monitors_reach_the_pods(rendered: list[Resource]) -> None:
    triton_pods = _find(rendered, "Deployment", TRITON)["spec"]["template"]
    service = _find(rendered, "Service", TRITON)
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": TRITON}
    assert _selects({"matchLabels": service["spec"]["selector"]}, triton_pods["metadata"]["labels"])
    container_ports = {
        p["name"] for p in _container(_find(rendered, "Deployment", TRITON))["ports"]
    }
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports

    service_monitor = _find(rendered, "ServiceMonitor", TRITON)["spec"]
    assert _selects(service_monitor["selector"], service["metadata"]["labels"])
    assert {e["port"] for e in service_monitor["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }
    # The alert rules select job="triton" and job="category-suggester".
    assert service["metadata"]["labels"][service_monitor["jobLabel"]] == TRITON

    consumer_pods = _find(rendered, "Deployment", CONSUMER)["spec"]["template"]
    pod_monitor = _find(rendered, "PodMonitor", CONSUMER)["spec"]
    assert _selects(pod_monitor["selector"], consumer_pods["metadata"]["labels"])
    consumer_ports = {
        p["name"] for p in _container(_find(rendered, "Deployment", CONSUMER))["ports"]
    }
    assert {e["port"] for e in pod_monitor["podMetricsEndpoints"]} <= consumer_ports
    assert consumer_pods["metadata"]["labels"][pod_monitor["jobLabel"]] == CONSUMER


def test_overlays_differ_in_namespace(kubectl: str) -> None:
    namespaces = {
        overlay: {r["metadata"].get("namespace") for r in _render(kubectl, overlay)}
        for overlay in OVERLAYS
    }
    for overlay, found in namespaces.items():
        assert len(found) == 1, (overlay, found)
        assert None not in found, overlay
    assert len({next(iter(found)) for found in namespaces.values()}) == len(OVERLAYS)
