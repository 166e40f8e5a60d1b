"""The Dockerfiles, read without a Docker engine: linted by hadolint, parsed by BuildKit's
own Dockerfile parser (the PyPI package `dockerfile`), and checked for what the service
image promises: multi-stage, slim, non-root, no build tools, a health check on /healthz.
"""

from __future__ import annotations

import fnmatch
import subprocess
from pathlib import Path

import dockerfile
import pytest

from category_suggester.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[3]
SERVICE_DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
DOCKERFILES = [SERVICE_DOCKERFILE, REPO_ROOT / "deploy" / "triton-cpu.Dockerfile"]
BUILD_TOOLS = ("pip install", "apt-get", "apk add", "gcc", "g++", "build-essential", "make ")

Stage = list[dockerfile.Command]


def _stages(path: Path) -> list[Stage]:
    stages: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(command)
    return stages


def _only(stage: Stage, instruction: str) -> dockerfile.Command:
    found = [c for c in stage if c.cmd == instruction]
    assert len(found) == 1, f"expected one {instruction}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(hadolint: str, path: Path) -> None:
    result = subprocess.run(
        [hadolint, "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_service_image_is_multi_stage_and_slim() -> None:
    stages = _stages(SERVICE_DOCKERFILE)
    assert len(stages) >= 2
    final = stages[-1]
    base = _only(final, "FROM").value[0]
    assert base.startswith("python:")
    assert "-slim" in base
    copies_from = [c for c in final if c.cmd == "COPY" and any("--from=" in f for f in c.flags)]
    assert copies_from, "the final stage copies its environment from the build stage"


def test_final_stage_has_no_build_tools_and_runs_as_a_numeric_non_root_user() -> None:
    final = _stages(SERVICE_DOCKERFILE)[-1]
    for command in final:
        if command.cmd == "RUN":
            text = " ".join(command.value)
            assert not any(tool in text for tool in BUILD_TOOLS), text
    user = _only(final, "USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit(), "a numeric uid lets Kubernetes enforce runAsNonRoot"
    assert int(uid) != 0
    # USER must come before the process starts: it is the last identity change.
    assert [c.cmd for c in final].index("USER") < [c.cmd for c in final].index("ENTRYPOINT")


def test_health_check_probes_healthz_on_the_service_port() -> None:
    final = _stages(SERVICE_DOCKERFILE)[-1]
    port = Settings().observability.port
    healthcheck = " ".join(_only(final, "HEALTHCHECK").value)
    assert f"127.0.0.1:{port}/healthz" in healthcheck
    assert _only(final, "EXPOSE").value == (str(port),)
    entrypoint = _only(final, "ENTRYPOINT")
    assert entrypoint.json
    assert entrypoint.value == ("python", "-m", "category_suggester")
    assert _only(final, "CMD").value == ("run",)


def test_copied_sources_exist_and_pass_the_build_context_filter() -> None:
    ignore = (SERVICE_DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    assert "*" in ignore, "the context filter starts from nothing"
    for stage in _stages(SERVICE_DOCKERFILE):
        for command in stage:
            if command.cmd != "COPY" or any("--from=" in f for f in command.flags):
                continue
            for source in command.value[:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert any(fnmatch.fnmatch(source, pattern) for pattern in allowed), source
