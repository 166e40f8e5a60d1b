"""docker-compose.yml: a real Compose implementation resolves it, then its wiring is checked.

Debian's docker-compose (1.29) validates the file against the Compose specification's
schema, interpolates variables and resolves `extends` and profiles, without a Docker
engine. Both Triton variants (TRITON_DEVICE=gpu, the default, and cpu) are resolved,
with every profile on.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from category_suggester.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[3]
DEVICES = ("gpu", "cpu")

Service = dict[str, Any]


def _tested_kafka_version() -> str:
    """The Kafka version devstack runs, which every integration test runs against."""
    pom = ET.parse(REPO_ROOT / "devstack" / "maven" / "kafka.xml")
    [version] = [e.text for e in pom.iter() if e.tag.endswith("kafka.version")]
    assert version is not None
    return version


def _config(docker_compose: str, device: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "TRITON_"))}
    env["TRITON_DEVICE"] = device
    result = subprocess.run(
        [docker_compose, "--profile", "loadgen", "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"docker-compose config ({device}):\n{result.stderr}"
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    param: str = request.param
    return param


@pytest.fixture(scope="module")
def config(docker_compose: str, device: str) -> dict[str, Any]:
    return _config(docker_compose, device)


def _service(config: dict[str, Any], name: str) -> Service:
    services: dict[str, Service] = config["services"]
    assert name in services, f"no service {name}"
    return services[name]


def _bind_mounts(service: Service) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def _listeners(value: str) -> dict[str, str]:
    return dict(item.split("://", 1) for item in value.split(","))


def test_every_service_is_defined(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {
        "kafka-controller",
        "kafka",
        "kafka-init",
        "schema-registry",
        "triton",
        "consumer",
        "prometheus",
        "grafana",
        "loadgen",
    }


def test_kafka_is_a_kraft_broker_advertising_container_and_host_addresses(
    config: dict[str, Any],
) -> None:
    kafka = _service(config, "kafka")
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["image"] == f"apache/kafka:{_tested_kafka_version()}", (
        "compose runs the broker version the tests run (devstack/maven/kafka.xml)"
    )
    env = kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker"
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert advertised["INTERNAL"] == "kafka:29092"
    assert advertised["EXTERNAL"].startswith("localhost:")
    assert set(advertised) == set(listeners)
    host_port = advertised["EXTERNAL"].rsplit(":", 1)[1]
    container_port = listeners["EXTERNAL"].rsplit(":", 1)[1]
    assert {"published": int(host_port), "target": int(container_port)} in [
        {"published": int(p["published"]), "target": int(p["target"])} for p in kafka["ports"]
    ]
    assert "healthcheck" in kafka


def test_the_kraft_controller_runs_apart_from_the_broker(config: dict[str, Any]) -> None:
    """A broker crash must leave the controller up (GUARANTEES.md, "Broker crashes")."""
    controller = _service(config, "kafka-controller")
    kafka = _service(config, "kafka")
    assert controller["image"] == kafka["image"]
    env, broker_env = controller["environment"], kafka["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "controller"
    assert env["CLUSTER_ID"] == broker_env["CLUSTER_ID"]
    assert env["KAFKA_NODE_ID"] != broker_env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert broker_env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voters
    voter_id, _, address = voters.partition("@")
    assert int(voter_id) == int(env["KAFKA_NODE_ID"])
    name = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert broker_env["KAFKA_CONTROLLER_LISTENER_NAMES"] == name
    assert _listeners(env["KAFKA_LISTENERS"]) == {name: ":" + address.rsplit(":", 1)[1]}
    assert address.startswith("kafka-controller:")
    assert kafka["depends_on"]["kafka-controller"]["condition"] == "service_started"


def test_topics_are_created_once_before_the_consumer_starts(config: dict[str, Any]) -> None:
    init = _service(config, "kafka-init")
    script = "\n".join(init["command"])
    defaults = Settings().kafka
    for topic in (defaults.input_topic, defaults.output_topic, defaults.dlq_topic):
        assert topic in script
    assert "--if-not-exists" in script
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    depends = _service(config, "consumer")["depends_on"]
    assert depends["kafka-init"]["condition"] == "service_completed_successfully"


def test_triton_serves_the_repository_for_its_device(config: dict[str, Any], device: str) -> None:
    triton = _service(config, "triton")
    source, mode = _bind_mounts(triton)["/models"]
    assert Path(source) == REPO_ROOT / "model_repository" / device
    assert mode == "ro"
    assert "--model-repository=/models" in triton["command"]
    assert "/v2/health/ready" in " ".join(triton["healthcheck"]["test"])
    reservations = triton.get("deploy", {}).get("resources", {}).get("reservations", {})
    if device == "gpu":
        assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
        assert triton["image"].endswith("-py3")
        (gpu,) = reservations["devices"]
        assert gpu["driver"] == "nvidia"
        assert "gpu" in gpu["capabilities"]
    else:
        assert "devices" not in reservations
        assert triton["build"]["dockerfile"] == "triton-cpu.Dockerfile"
        assert (Path(triton["build"]["context"]) / "triton-cpu.Dockerfile").is_file()


def test_consumer_waits_for_healthy_dependencies_and_is_configured(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    consumer = _service(config, "consumer")
    depends = consumer["depends_on"]
    for dependency in ("kafka", "triton", "schema-registry"):
        assert depends[dependency]["condition"] == "service_healthy", dependency
    assert consumer["build"]["dockerfile"] == "deploy/Dockerfile"

    for key in list(os.environ):
        if key.startswith("SUGGESTER_"):
            monkeypatch.delenv(key)
    for key, value in consumer["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "kafka:29092"
    assert settings.triton.url == "triton:8001"
    assert settings.registry.url == "http://schema-registry:8081"
    loadgen_command = " ".join(_service(config, "loadgen")["command"])
    assert "--serve-host=loadgen" in loadgen_command
    assert "--serve-port=8090" in loadgen_command
    assert "loadgen:8090" in settings.fetch.allowed_hosts

    grace = consumer["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > settings.consumer.shutdown_grace_s


def test_prometheus_scrapes_the_consumer_and_triton_and_loads_the_rules(
    config: dict[str, Any],
) -> None:
    prometheus = _service(config, "prometheus")
    source, mode = _bind_mounts(prometheus)["/etc/prometheus"]
    assert Path(source) == REPO_ROOT / "deploy" / "prometheus"
    assert mode == "ro"
    scrape = yaml.safe_load((Path(source) / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    consumer_sd = jobs["category-suggester"]["dns_sd_configs"][0]
    assert consumer_sd["names"] == ["consumer"]
    assert consumer_sd["port"] == Settings().observability.port
    assert jobs["triton"]["static_configs"][0]["targets"] == ["triton:8002"]
    assert scrape["rule_files"] == ["rules/*.yml"]


def test_grafana_is_provisioned_from_files(config: dict[str, Any]) -> None:
    grafana = _service(config, "grafana")
    mounts = _bind_mounts(grafana)
    provisioning, _ = mounts["/etc/grafana/provisioning"]
    dashboards, _ = mounts["/etc/grafana/dashboards"]
    assert Path(provisioning) == REPO_ROOT / "deploy" / "grafana" / "provisioning"
    assert Path(dashboards) == REPO_ROOT / "deploy" / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (Path(dashboards) / Path(home).name).is_file()
    provider = yaml.safe_load(
        (Path(provisioning) / "dashboards" / "category-suggester.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_loadgen_runs_only_in_its_profile(config: dict[str, Any]) -> None:
    profiled = {name for name, s in config["services"].items() if s.get("profiles")}
    assert profiled == {"loadgen"}
    assert _service(config, "loadgen")["profiles"] == ["loadgen"]
