"""The wheel is the service: one import package with its schemas and page, nothing else.

Built from a copy of the checkout's packages, as deploy/Dockerfile builds it; training/
and devstack/ are in the copy, so leaving them out is the configuration's doing.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import category_suggester
from tests.support.python import REPO_ROOT, run_python

SERVICE = category_suggester.__name__
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "photos")


def test_the_wheel_installs_only_the_service_package(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for package in (SERVICE, "training", "devstack"):
        shutil.copytree(REPO_ROOT / package, source / package, ignore=_SKIP)
    out = tmp_path / "wheel"
    run_python(
        "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
        "--wheel-dir", str(out), str(source),
    )  # fmt: skip
    [wheel] = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {SERVICE}
    for needed in (
        "__main__.py",
        "ops/ledger.py",
        "schemas/listing_image_uploaded.avsc",
        "schemas/history/category_suggestion/v1.avsc",
        "static/index.html",
    ):
        assert f"{SERVICE}/{needed}" in names
