"""`python -m bench --smoke` on the real stack: every phase runs and the report is complete.

No timing is asserted (the smoke mode runs each phase for a few events on a shared
machine); what is checked is that the harness drives the real service, the naive consumer,
Triton and the origin, counts every answer on the output topic, reads CPU and memory from
/proc and writes the JSON, the Markdown and the summary with one line per target.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.kafka import KafkaBroker
from tests.conftest import REPO_ROOT, ServedModel

pytestmark = pytest.mark.integration

RUNS = {"naive", "service", "service-50", "overhead"}
TARGETS = 7


def test_smoke_mode_runs_every_phase_and_writes_the_report(
    kafka: KafkaBroker, served_model: ServedModel, tmp_path: Path
) -> None:
    out = tmp_path / "results"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--kafka-bootstrap",
            kafka.bootstrap_servers,
            "--onnx",
            str(served_model.onnx_path),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-6000:]

    document = json.loads((out / "latest.json").read_text())
    assert set(document["runs"]) == RUNS
    for name, run in document["runs"].items():
        assert run["answered"] == run["events"] > 0, (name, output[-4000:])
        assert run["dead_lettered"] == 0, name
        assert run["duplicates"] == 0, name
        assert run["events_per_s"] > 0, name
        assert {"consumer", "triton", "origin"} <= set(run["cpu_ms_per_event"]), name
        assert run["consumer_peak_rss_mb"] > 0, name
        assert run["triton_batch_size"] >= 1, name
        assert run["origin_latency_ms"]["count"] > 0, name
    assert document["runs"]["naive"]["triton_request_size"] == 1
    assert document["runs"]["service-50"]["latency_ms"]["count"] > 0

    ceiling = document["ceiling"]
    assert ceiling["triton_best"]["images_per_s"] > 0
    assert ceiling["decode"]["images_per_s"] > 0
    assert (
        0
        < ceiling["bound"]
        < min(ceiling["triton_best"]["images_per_s"], ceiling["decode"]["images_per_s"])
    )
    assert document["overhead_parts_cpu_us"]["fetch_us_by_concurrency"]

    statuses = [target["status"] for target in document["targets"]]
    assert len(statuses) == TARGETS
    assert set(statuses) <= {"PASS", "FAIL", "NOT RUN"}
    assert statuses.count("NOT RUN") == 1, "only the soak is left out"

    markdown = (out / "latest.md").read_text()
    for heading in ("## Comparisons", "## Targets", "## Runs", "## Ceilings"):
        assert heading in markdown
    summary = completed.stdout.split("== comparisons (same run) ==", 1)[1]
    for kind in ("naive", "ceiling", "service", "overhead"):
        assert f"\n{kind} " in summary, summary
    assert sum(line.startswith(("PASS", "FAIL")) for line in summary.splitlines()) == TARGETS - 1
