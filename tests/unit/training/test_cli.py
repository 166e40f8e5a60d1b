"""`python -m training`: one entry point; errors are one line and status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.__main__ import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_every_step_is_a_command() -> None:
    parser = build_parser()
    for argv in (
        ["prepare", "src", "--out", "o"],
        ["train", "--data", "d", "--out", "o"],
        ["evaluate", "--checkpoint", "c", "--data", "d"],
        ["export", "--checkpoint", "c"],
        ["tensorrt"],
        ["demo"],
    ):
        assert parser.parse_args(argv).command == argv[0]
    args = parser.parse_args(["train", "--data", "d", "--out", "o"])
    assert (args.image_size, args.weights, args.lr_gamma) == (112, "imagenet", 0.9)


def test_a_step_error_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "is not a folder" in err
    status = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    assert status == 2
    assert "no manifest" in capsys.readouterr().err


def test_demo_runs_the_whole_workflow(tmp_path: Path) -> None:
    """The demo command end to end, shrunk: 6 photos per class, 32 px, one epoch."""
    out, repo = tmp_path / "demo", tmp_path / "repo"
    done = subprocess.run(
        [sys.executable, "-m", "training", "demo", "--out", str(out), "--repository",
         str(repo), "--per-class", "6", "--epochs", "1", "--image-size", "32",
         "--weights", "none", "--workers", "0", "--threads", "2", "--no-progress"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported version 1" in done.stdout
    assert "FROM SCRATCH" in done.stderr
    assert (out / "data" / "manifest.csv").is_file()
    report = json.loads((out / "train" / "eval" / "report.json").read_text())
    assert report["metrics"]["images"] == 10
    for kind in ("cpu", "gpu"):
        assert (repo / kind / "category_classifier" / "1" / "threshold.json").is_file()
