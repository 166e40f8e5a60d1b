"""`python -m training`: one entry point; errors are one line and status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.__main__ import build_parser, main
from training.zero_shot import PHOTOS

REPO_ROOT = Path(__file__).resolve().parents[3]


def run_training(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m training ARGS` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )


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
    assert (args.arch, args.freeze_backbone) == ("resnet34", False)
    assert parser.parse_args(["evaluate", "--model", "zero-shot", "--data", "d"]).model == (
        "zero-shot"
    )
    demo = parser.parse_args(["demo"])
    assert (demo.arch, demo.image_size, demo.synthetic) == ("efficientnet_lite0", 224, False)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--data", "d", "--out", "o", "--arch", "resnet50"])


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
    """The demo command end to end on synthetic photos, shrunk: 6 per class, 32 px, one epoch."""
    out, repo = tmp_path / "demo", tmp_path / "repo"
    done = run_training(
        "demo", "--synthetic", "--out", str(out), "--repository", str(repo), "--per-class", "6",
        "--epochs", "1", "--image-size", "32", "--weights", "none", "--workers", "0",
        "--threads", "2", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exported version 1" in done.stdout
    assert "FROM SCRATCH" in done.stderr
    assert (out / "data" / "manifest.csv").is_file()
    report = json.loads((out / "train" / "eval" / "report.json").read_text())
    assert report["metrics"]["images"] == 10
    for kind in ("cpu", "gpu"):
        assert (repo / kind / "category_classifier" / "1" / "threshold.json").is_file()


def test_evaluate_the_zero_shot_model_with_out_of_category_photos(tmp_path: Path) -> None:
    """`evaluate --model zero-shot --ood DIR` on a few real photos prints the trade-off."""
    raw, ood = tmp_path / "raw", tmp_path / "ood"
    for category in ("car", "motorcycle"):
        (raw / category).mkdir(parents=True)
        for path in sorted((PHOTOS / category).glob("*.jpg"))[:3]:
            (raw / category / path.name).symlink_to(path)
    ood.mkdir()
    for path in sorted((PHOTOS / "out_of_category").glob("*.jpg"))[:4]:
        (ood / path.name).symlink_to(path)
    assert main(["prepare", str(raw), "--out", str(tmp_path / "data"), "--no-progress"]) == 0
    out = tmp_path / "eval"
    done = run_training(
        "evaluate", "--model", "zero-shot", "--data", str(tmp_path / "data"), "--split", "all",
        "--ood", str(ood), "--out", str(out), "--threads", "2", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| threshold | coverage | confident precision | OOD confident |" in done.stdout
    assert "target cold-start" in done.stdout
    report = json.loads((out / "report.json").read_text())
    metrics = report["metrics"]
    assert (metrics["images"], metrics["ood_images"]) == (6, 4)
    assert metrics["accuracy"] == 1.0
    assert report["arch"] == "efficientnet_lite0"
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["ood_images"] == 4
    # At most 5% of 4 photos: none may be confident at the recommended threshold.
    assert threshold["ood_confident"] == 0.0
