"""`python -m training <command>`: prepare, train, evaluate, export, tensorrt, demo.

Each command is one step module; this file only parses arguments and calls it. Exit
status: 0 on success, 2 when a step raises a `TrainingError` (the message says why, no
traceback), 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from training.errors import TrainingError
from training.evaluate import DEFAULT_MAX_OOD_CONFIDENT, SPLIT_CHOICES, SUMMARY_NAME
from training.model import ARCHS, DEFAULT_ARCH
from training.zero_shot import PHOTOS

log = logging.getLogger("training")


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--threads", type=int, help="torch intra-op CPU threads (default: torch's choice)"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bars")
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Raw labelled photos -> a served model: prepare, train, evaluate, export.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "prepare",
        parents=[common],
        help="download/decode/deduplicate photos, write a split manifest",
        description="SOURCE holds one folder per category, with image files or a data.csv "
        "of image URLs. Writes OUT/manifest.csv, labels.txt, prepare_report.json, images/.",
    )
    p.add_argument("source", type=Path, help="folder with one sub-folder per category")
    p.add_argument("--out", type=Path, required=True, help="output folder (reruns resume)")
    p.add_argument("--stored-size", type=int, default=256, help="shorter side kept (px)")
    p.add_argument("--val-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=8, help="decoding threads")
    p.add_argument("--download-workers", type=int, default=16, help="parallel downloads")
    p.add_argument("--attempts", type=int, default=3, help="tries per URL")
    p.add_argument("--timeout", type=float, default=20.0, help="read timeout per URL (s)")

    t = commands.add_parser(
        "train",
        parents=[common],
        help="fine-tune ResNet-34 or EfficientNet-Lite0 on a prepared manifest",
        description="Writes OUT/best.pt (best validation accuracy), last.pt (resumable), "
        "history.json, labels.txt. A class named out_of_category is trained and then folded "
        "away at export (photos of no category are not marked confident).",
    )
    t.add_argument("--data", type=Path, required=True, help="folder that prepare wrote")
    t.add_argument("--out", type=Path, required=True, help="run folder")
    t.add_argument(
        "--arch",
        choices=ARCHS,
        default=DEFAULT_ARCH,
        help="resnet34 (default; ImageNet weights from torchvision) or efficientnet_lite0 "
        "(ImageNet weights installed with the project: works offline)",
    )
    t.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="train only the last stage and the head (fast on a CPU)",
    )
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=0.01, help="initial learning rate")
    t.add_argument("--lr-gamma", type=float, default=0.9, help="LR decay per epoch")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--image-size", type=int, default=112, help="112 (default) or 224")
    t.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (default), none (from scratch, on purpose), or a path to a .pth "
        "state_dict of the architecture",
    )
    t.add_argument("--crop-scale", type=float, default=0.35, help="min area of random crops")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    t.add_argument("--jitter", type=float, default=0.2, help="brightness/contrast/saturation")
    t.add_argument("--hue", type=float, default=0.02, help="hue jitter")
    t.add_argument("--label-smoothing", type=float, default=0.0)
    t.add_argument("--workers", type=int, help="loader processes (default: cores, max 32)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--no-amp", action="store_true", help="no mixed precision on GPU")
    t.add_argument("--no-channels-last", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--deterministic", action="store_true", help="reproducible CUDA kernels")
    t.add_argument("--resume", type=Path, help="last.pt of an interrupted run")

    e = commands.add_parser(
        "evaluate",
        parents=[common],
        help="metrics, confusion matrix, calibration, out-of-category, confidence threshold",
        description="Writes report.json, summary.md, confusion_matrix.{png,txt}, "
        "predictions.csv and threshold.json into OUT (default: beside the checkpoint).",
    )
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", type=Path, help="best.pt of a run")
    which.add_argument(
        "--model",
        choices=("zero-shot",),
        help="zero-shot: the cold-start model (EfficientNet-Lite0 ImageNet classes mapped "
        "to the categories)",
    )
    e.add_argument("--data", type=Path, required=True, help="folder that prepare wrote")
    e.add_argument("--out", type=Path, help="default: <checkpoint folder>/eval")
    e.add_argument("--split", default="val", choices=SPLIT_CHOICES)
    e.add_argument(
        "--ood",
        type=Path,
        help="folder of photos of none of the categories (out_of_category photos of the "
        "split count as well)",
    )
    e.add_argument("--target-accuracy", type=float, default=0.95, help="confident precision")
    e.add_argument(
        "--max-ood-confident",
        type=float,
        default=DEFAULT_MAX_OOD_CONFIDENT,
        help="largest share of out-of-category photos marked confident (default 0.05)",
    )
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--device", default="auto")

    x = commands.add_parser(
        "export",
        parents=[common],
        help="ONNX export with parity check into new versions of the Triton repositories",
    )
    x.add_argument("--checkpoint", type=Path, required=True)
    x.add_argument("--evaluation", type=Path, help="default: <checkpoint folder>/eval")
    x.add_argument("--repository", type=Path, default=Path("model_repository"))
    x.add_argument("--kind", choices=("cpu", "gpu"), action="append", help="default: both")
    x.add_argument("--version", type=int, help="default: next free number in all kinds")
    x.add_argument("--data", type=Path, help="manifest for parity images (default: evaluated)")
    x.add_argument("--atol", type=float, default=1e-4, help="parity tolerance on probabilities")
    x.add_argument("--max-batch-size", type=int, help="Triton max_batch_size (default 64)")

    r = commands.add_parser(
        "tensorrt",
        parents=[common],
        help="build an FP16 TensorRT plan on this GPU machine and serve it",
    )
    r.add_argument("--repository", type=Path, default=Path("model_repository"))
    r.add_argument("--version", type=int, help="default: latest GPU version")
    r.add_argument("--max-batch-size", type=int, help="default: the GPU config's")
    r.add_argument("--workspace-gib", type=float, default=4.0)
    r.add_argument("--atol", type=float, default=0.03, help="plan vs ONNX tolerance")
    r.add_argument("--force", action="store_true", help="replace an existing plan")

    d = commands.add_parser(
        "demo",
        parents=[common],
        help="real photos -> prepare -> train -> evaluate -> export, on a CPU in minutes",
        description="Fine-tunes EfficientNet-Lite0 (ImageNet weights, backbone frozen but its "
        "last stage) on the committed real photos (training/photos), evaluates on the "
        "held-out 30%% and exports a new version.",
    )
    d.add_argument("--out", type=Path, default=Path("runs/demo"))
    d.add_argument("--photos", type=Path, default=PHOTOS, help="one folder per category")
    d.add_argument(
        "--synthetic", action="store_true", help="synthetic drawings instead (for tests)"
    )
    d.add_argument("--repository", type=Path, default=Path("model_repository"))
    d.add_argument("--no-export", action="store_true", help="stop after evaluate")
    d.add_argument("--per-class", type=int, default=40, help="synthetic photos per class")
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--arch", choices=ARCHS, default="efficientnet_lite0")
    d.add_argument("--weights", default="imagenet", help="imagenet or none")
    d.add_argument("--train-all", action="store_true", help="train the whole backbone (slower)")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--seed", type=int, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.command == "prepare":
        from training.prepare import DownloadPolicy, prepare

        report = prepare(
            args.source,
            args.out,
            stored_size=args.stored_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            workers=args.workers,
            download=DownloadPolicy(
                workers=args.download_workers, attempts=args.attempts, read_timeout_s=args.timeout
            ),
            progress=progress,
        )
        print(report.summary())
        shown = 20
        for item in report.dropped[:shown]:
            print(f"  dropped {item.category}: {item.source}: {item.reason} ({item.detail})")
        if len(report.dropped) > shown:
            print(f"  ... and {len(report.dropped) - shown} more in prepare_report.json")
        print(f"manifest: {args.out / 'manifest.csv'}; report: {args.out / 'prepare_report.json'}")
        return 0

    if args.command == "train":
        from training.data import Augment
        from training.train import TrainConfig, train

        result = train(
            TrainConfig(
                manifest=args.data,
                out=args.out,
                arch=args.arch,
                freeze_backbone=args.freeze_backbone,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                momentum=args.momentum,
                weight_decay=args.weight_decay,
                lr_gamma=args.lr_gamma,
                image_size=args.image_size,
                weights=args.weights,
                augment=Augment(
                    crop_scale=(args.crop_scale, 1.0),
                    flip=not args.no_flip,
                    jitter=args.jitter,
                    hue=args.hue,
                ),
                label_smoothing=args.label_smoothing,
                workers=args.workers,
                device=args.device,
                amp=not args.no_amp,
                channels_last=not args.no_channels_last,
                seed=args.seed,
                deterministic=args.deterministic,
                resume=args.resume,
                progress=progress,
            )
        )
        print(
            f"best validation accuracy {result.best_val_accuracy:.4f} (epoch "
            f"{result.best_epoch}, weights: {result.initialisation}): {result.best_checkpoint}"
        )
        return 0

    if args.command == "evaluate":
        from training.evaluate import evaluate
        from training.train import Checkpoint

        model: Path | Checkpoint
        if args.model == "zero-shot":
            from training.zero_shot import zero_shot_checkpoint

            model = zero_shot_checkpoint()
            out = args.out or Path("runs") / "zero-shot" / "eval"
        else:
            model = args.checkpoint
            out = args.out or args.checkpoint.parent / "eval"
        evaluation = evaluate(
            model,
            args.data,
            out,
            split=args.split,
            ood=args.ood,
            target_accuracy=args.target_accuracy,
            max_ood_confident=args.max_ood_confident,
            batch_size=args.batch_size,
            workers=args.workers,
            device=args.device,
            progress=progress,
        )
        print((out / SUMMARY_NAME).read_text())
        print(f"accuracy {evaluation.accuracy:.4f}; outputs in {out}")
        return 0

    if args.command == "export":
        from training.export import export

        exported = export(
            args.checkpoint,
            args.evaluation or args.checkpoint.parent / "eval",
            repo_root=args.repository,
            kinds=tuple(args.kind or ("cpu", "gpu")),
            version=args.version,
            manifest=args.data,
            atol=args.atol,
            max_batch_size=args.max_batch_size,
        )
        for kind, directory in exported.directories.items():
            print(f"{kind}: {directory}")
        print(
            f"version {exported.version}; ONNX/PyTorch max |diff| {exported.max_abs_diff:.2e} "
            f"on {exported.parity_images} images"
        )
        return 0

    if args.command == "tensorrt":
        from training.tensorrt import build_into_repository

        plan = build_into_repository(
            args.repository,
            version=args.version,
            max_batch_size=args.max_batch_size,
            workspace_bytes=int(args.workspace_gib * (1 << 30)),
            atol=args.atol,
            force=args.force,
        )
        print(f"plan {plan.plan} (batch 1..{plan.max_batch_size}); config {plan.config}")
        return 0

    if args.command == "demo":
        from training.demo import demo

        outcome = demo(
            args.out,
            photos=args.photos,
            synthetic=args.synthetic,
            repo_root=None if args.no_export else args.repository,
            arch=args.arch,
            weights=args.weights,
            freeze_backbone=not args.train_all,
            per_class=args.per_class,
            epochs=args.epochs,
            image_size=args.image_size,
            workers=args.workers,
            seed=args.seed,
            progress=progress,
        )
        summary = outcome.evaluation.out / SUMMARY_NAME
        print(summary.read_text())
        print(
            f"demo: held-out accuracy {outcome.evaluation.accuracy:.4f}, "
            f"threshold {outcome.evaluation.threshold:.4f}, {outcome.seconds:.0f} s; "
            f"run in {args.out}"
        )
        if outcome.export is not None:
            print(f"exported version {outcome.export.version} into {args.repository}")
        return 0
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with logging_redirect_tqdm():
            return run(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
