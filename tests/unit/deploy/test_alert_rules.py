"""The Prometheus configuration and rules: promtool checks them and runs their unit tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
OPERATIONS = REPO_ROOT / "deploy" / "OPERATIONS.md"


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load((PROMETHEUS_DIR / "rules" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def _test_files() -> list[Path]:
    return sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))


def test_config_and_rule_files_are_valid(promtool: str) -> None:
    result = _promtool(promtool, "check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_rule_unit_tests_pass(promtool: str) -> None:
    files = [str(path.relative_to(PROMETHEUS_DIR)) for path in _test_files()]
    assert files, "no promtool rule tests found"
    result = _promtool(promtool, "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_test_case() -> None:
    fired: set[str] = set()
    for path in _test_files():
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    untested = {rule["alert"] for rule in _alerts()} - fired
    assert not untested, f"alerts never shown firing in a promtool test: {sorted(untested)}"


def test_every_alert_has_severity_and_a_runbook_section() -> None:
    anchors = {
        re.sub(r"[^a-z0-9-]", "", line.lstrip("#").strip().lower().replace(" ", "-"))
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"page", "ticket", "warning"}, rule["alert"]
        runbook = rule["annotations"]["runbook"]
        path, _, anchor = runbook.partition("#")
        assert path == "deploy/OPERATIONS.md", rule["alert"]
        assert anchor in anchors, f"{rule['alert']}: no section #{anchor} in {path}"
