"""`python -m category_suggester produce-sample` against the real service: each answer printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devstack.process import free_port
from tests.conftest import REPO_ROOT, ServiceFactory
from tests.support.images import photo
from tests.support.origin import ImageOrigin

pytestmark = pytest.mark.integration


def test_produce_sample_prints_the_suggestion_or_the_dlq_reason_of_each_image(
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    service_env: dict[str, str],
    tmp_path: Path,
) -> None:
    port = free_port()
    allowed = {"SUGGESTER_FETCH__ALLOWED_HOSTS": f"{image_origin.host_port},127.0.0.1:{port}"}
    service = start_service(**allowed)
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "chair.jpg").write_bytes(photo(31))
    (folder / "notes.png").write_bytes(b"not a picture at all")
    service.wait_ready()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "category_suggester",
            "produce-sample",
            "--images",
            str(folder),
            "--serve-port",
            str(port),
            "--wait-s",
            "90",
        ],
        env=service_env | allowed,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "published 2 event(s) to " + service_env["SUGGESTER_KAFKA__INPUT_TOPIC"]
    (chair,) = [line for line in lines if line.endswith("/chair.jpg")]
    assert "(confident)" in chair or "(not confident)" in chair
    (notes,) = [line for line in lines if line.endswith("/notes.png")]
    assert "DLQ stage=fetch reason=not_an_image" in notes
