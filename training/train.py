"""Train: a prepared manifest -> a fine-tuned ResNet-34 or EfficientNet-Lite0 checkpoint.

Takes a `TrainConfig` (the manifest folder that `prepare` wrote, an output folder and the
hyper-parameters). Trains torchvision's ResNet-34 (`arch="resnet34"`, the default) starting
from ImageNet weights (torchvision's weights API, or a local file given by path), or
EfficientNet-Lite0 (`arch="efficientnet_lite0"`) from the ImageNet weights installed with
the project, which need no network. When ResNet-34's weights cannot be had, training stops
and says how to go on (the offline backbone, or `weights="none"` to train from scratch on
purpose); it never falls back to random weights by itself. `freeze_backbone` trains only
the last stage and the head (minutes on a CPU). SGD with momentum, exponential
learning-rate decay per epoch; mixed precision and channels-last memory on a GPU.

A manifest class named `out_of_category` (training.model.BACKGROUND_LABEL) is trained like
any other and folded away at export: its probability is spread over the categories, so
photos of none of them are not marked confident.

Writes into `out`:
- `best.pt`: the weights of the epoch with the best validation accuracy, with the labels,
  image size and config (what evaluate and export read);
- `last.pt`: everything needed to resume (optimizer, scheduler, scaler, history);
- `labels.txt`, `history.json` (per-epoch loss, accuracy, images/s), `train_config.json`.
Returns a `TrainResult`.

Validation uses the service's preprocessing (resize, centre crop), so its accuracy is the
accuracy of the served model. Seeded throughout: model initialisation from the seed, the
shuffle and augmentations of each epoch from (seed, epoch); on the CPU two runs with the
same seed give the same weights, and `deterministic=True` asks the same of CUDA kernels.

Raises `DataError` (unusable manifest), `CheckpointError` (a weights file or resume
checkpoint that does not fit).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torchvision
from torch import nn
from tqdm import tqdm

from training.data import (
    Augment,
    EpochSampler,
    ImageDataset,
    Manifest,
    default_workers,
    eval_transform,
    make_loader,
    normalize,
    read_manifest,
    train_transform,
)
from training.errors import CheckpointError, DataError
from training.model import (
    ARCH_NAMES,
    DEFAULT_ARCH,
    Arch,
    ServingModel,
    background_fold,
    build_model,
    check_arch,
    new_network,
    served_labels,
    write_labels,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT: Final = "category-suggester/resnet34-checkpoint/1"
BEST_NAME: Final = "best.pt"
LAST_NAME: Final = "last.pt"
HISTORY_NAME: Final = "history.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. `weights` is "imagenet", "none" or a path;
    `arch` one of training.model.ARCHS."""

    manifest: Path
    out: Path
    arch: str = DEFAULT_ARCH
    freeze_backbone: bool = False
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_gamma: float = 0.9
    image_size: int = 112
    weights: str = "imagenet"
    augment: Augment = field(default_factory=Augment)
    label_smoothing: float = 0.0
    workers: int | None = None
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    deterministic: bool = False
    resume: Path | None = None
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON- and checkpoint-safe: paths as strings, tuples as lists."""
        return json.loads(json.dumps(asdict(self), default=str))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    images_per_s: float
    data_wait_fraction: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_accuracy: float
    history: list[EpochStats]
    initialisation: str


@dataclass(frozen=True)
class Checkpoint:
    """A classifier as evaluate and export need it.

    `labels` are the categories served, in output order; `fold` maps the classifier's
    classes onto them (None: one output per category); see training.model.ServingModel.
    """

    classifier: nn.Module
    labels: list[str]
    image_size: int
    meta: dict[str, Any]
    arch: Arch = DEFAULT_ARCH
    fold: torch.Tensor | None = None

    def serving_model(self) -> ServingModel:
        """The graph export writes: uint8 pixels in, category probabilities out."""
        return ServingModel(self.classifier, arch=self.arch, fold=self.fold)


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {name!r} requested but CUDA is not available")
    return device


def seed_everything(seed: int, *, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; choose reproducible or fastest CUDA kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _loud(message: str) -> None:
    bar = "!" * 78
    log.warning("\n%s\n%s\n%s", bar, message, bar)


# The classifier head of each architecture, replaced for a new set of classes.
_HEAD_PREFIX: Final[dict[Arch, str]] = {"resnet34": "fc.", "efficientnet_lite0": "_fc."}
# What `freeze_backbone` leaves trainable: the last stage and the head.
_TRAINABLE_PREFIXES: Final[dict[Arch, tuple[str, ...]]] = {
    "resnet34": ("layer4.", "fc."),
    "efficientnet_lite0": ("_blocks.14.", "_blocks.15.", "_conv_head.", "_bn1.", "_fc."),
}


def initial_model(
    weights: str, num_classes: int, arch: Arch = DEFAULT_ARCH
) -> tuple[nn.Module, str]:
    """The starting network and a description of where its weights came from.

    "imagenet": ResNet-34 through torchvision's weights API, EfficientNet-Lite0 from the
    installed weights package; "none": random initialisation (loudly); a path: an ImageNet
    state_dict of `arch` (its 1000-way head is replaced) or one of our checkpoints with the
    same classes (fine-tuning goes on from it). Raises CheckpointError when ImageNet
    weights cannot be had, naming the ways on: it never trains from scratch unasked.
    """
    if weights == "none":
        _loud("Training FROM SCRATCH (--weights none): expect far lower accuracy than transfer.")
        scratch = build_model(num_classes, arch=arch, weights=None)
        return _zero_init_residual(scratch), "random initialisation"
    if weights == "imagenet" and arch == "efficientnet_lite0":
        try:
            return build_model(num_classes, arch=arch, weights="imagenet"), "ImageNet (installed)"
        except FileNotFoundError as exc:
            raise CheckpointError(str(exc)) from exc
    if weights == "imagenet":
        try:
            model = build_model(num_classes, arch=arch, weights="imagenet")
        # URLError (no network) is an OSError; torch.hub raises RuntimeError for a file
        # whose hash does not match.
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"ResNet-34's ImageNet weights are not available ({exc}). Give a local copy "
                "with --weights /path/to/resnet34-b627a593.pth, or train the offline backbone "
                "with --arch efficientnet_lite0 (its ImageNet weights are installed), or train "
                "from scratch on purpose with --weights none (far lower accuracy)."
            ) from exc
        return model, "ImageNet (torchvision)"
    return _from_file(Path(weights), num_classes, arch), f"file {weights}"


def _zero_init_residual(model: nn.Module) -> nn.Module:
    """Start every residual block as the identity (its last batch-norm scale at zero).

    From scratch this trains markedly faster and more stably (Goyal et al., 2017); it is
    torchvision's `zero_init_residual`, applied after the model is built. EfficientNet's
    blocks end in a projection without activation and are left as they are.
    """
    for block in model.modules():
        if isinstance(block, torchvision.models.resnet.BasicBlock):
            nn.init.zeros_(block.bn2.weight)
    return model


def _from_file(path: Path, num_classes: int, arch: Arch) -> nn.Module:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    state = loaded
    if isinstance(loaded, Mapping):
        state = loaded.get("model_state", loaded.get("state_dict", loaded))
    head = _HEAD_PREFIX[arch]
    if not isinstance(state, Mapping) or f"{head}weight" not in state:
        raise CheckpointError(f"{path} holds no {ARCH_NAMES[arch]} state_dict")
    model = new_network(arch, num_classes)
    head_weight = state[f"{head}weight"]
    if isinstance(head_weight, torch.Tensor) and head_weight.shape[0] == num_classes:
        body = dict(state)
    else:
        # An ImageNet (or other-task) backbone: keep everything but the head, which stays
        # freshly initialised for our classes.
        body = {key: value for key, value in state.items() if not key.startswith(head)}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit {ARCH_NAMES[arch]}: {exc}") from exc
    if unexpected or set(missing) - {f"{head}weight", f"{head}bias"}:
        raise CheckpointError(
            f"{path} does not fit {ARCH_NAMES[arch]}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    log.info("%s weights from %s (%s head)", arch, path, "new" if missing else "its own")
    return model


def freeze_backbone(model: nn.Module, arch: Arch) -> list[nn.Module]:
    """Stop gradients to all but the last stage and the head; return the frozen modules
    that hold batch-norm statistics, which must stay in eval mode while training."""
    trainable = _TRAINABLE_PREFIXES[arch]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith(trainable))
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.BatchNorm2d) and not f"{name}.".startswith(trainable)
    ]


def load_checkpoint(path: Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint that `train` wrote; the classifier is in eval mode on `device`."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by `training train`")
    labels = list(data["labels"])
    # Checkpoints from before the architecture choice are ResNet-34's.
    try:
        arch = check_arch(str(data.get("arch", DEFAULT_ARCH)))
        fold = background_fold(labels)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    model = new_network(arch, len(labels))
    try:
        model.load_state_dict(data["model_state"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {ARCH_NAMES[arch]}: {exc}") from exc
    model.to(device).eval()
    meta = {k: v for k, v in data.items() if not k.endswith("_state")}
    return Checkpoint(
        classifier=model,
        labels=served_labels(labels),
        image_size=int(data["image_size"]),
        meta=meta,
        arch=arch,
        fold=fold,
    )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on batch-norm scales and biases: shrinking them only hurts. Frozen
    # parameters stay out: momentum and weight decay would move them all the same.
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    rest = [p for p in trainable if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


AutocastFactory = Callable[[], AbstractContextManager[Any]]


def _autocast(device: torch.device, enabled: bool) -> tuple[AutocastFactory, bool]:
    """A maker of the mixed-precision context for the device, and whether the loss needs
    scaling (float16; bfloat16 has float32's range and does not)."""
    if not enabled or device.type != "cuda":
        return nullcontext, False
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype), dtype == torch.float16


def train(config: TrainConfig) -> TrainResult:
    """Run training as configured (see the module docstring)."""
    if config.epochs < 1 or config.batch_size < 1 or config.lr <= 0:
        raise DataError("epochs, batch size and learning rate must be positive")
    if config.image_size < 32:
        raise DataError(f"image size {config.image_size} is below the minimum of 32")
    try:
        arch = check_arch(config.arch)
    except ValueError as exc:
        raise DataError(str(exc)) from exc
    manifest = read_manifest(config.manifest)
    train_samples, val_samples = manifest.split("train"), manifest.split("val")
    if not train_samples or not val_samples:
        raise DataError(f"{manifest.root}: both the train and the val split need images")
    device = resolve_device(config.device)
    seed_everything(config.seed, deterministic=config.deterministic)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_labels(out / "labels.txt", manifest.labels)
    (out / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    resume_state = None if config.resume is None else _read_resume(config.resume, manifest, config)
    if resume_state is None:
        model, initialisation = initial_model(config.weights, len(manifest.labels), arch)
    else:
        # The weights come from the checkpoint; fetching the initial ones would be wasted.
        model = new_network(arch, len(manifest.labels))
        initialisation = str(resume_state["initialisation"])
    frozen = freeze_backbone(model, arch) if config.freeze_backbone else []
    channels_last = config.channels_last and device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        _param_groups(model, config.weight_decay), lr=config.lr, momentum=config.momentum
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_gamma)
    autocast, needs_scaling = _autocast(device, config.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaling)

    start_epoch, best_accuracy, best_epoch = 0, -1.0, 0
    history: list[EpochStats] = []
    if resume_state is not None:
        state = resume_state
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        if state["scaler_state"] and scaler.is_enabled():
            # Empty when the run so far had no float16 loss scaling (CPU, or bfloat16).
            scaler.load_state_dict(state["scaler_state"])
        start_epoch = int(state["epoch"])
        best_accuracy, best_epoch = float(state["best_val_accuracy"]), int(state["best_epoch"])
        history = [EpochStats(**row) for row in state["history"]]
        log.info("resumed from %s after epoch %d", config.resume, start_epoch)

    workers = default_workers() if config.workers is None else config.workers
    pin = device.type == "cuda"
    train_sampler = EpochSampler(len(train_samples), seed=config.seed, shuffle=True)
    train_loader = make_loader(
        ImageDataset(
            train_samples, train_transform(config.image_size, config.augment), seed=config.seed
        ),
        train_sampler,
        batch_size=config.batch_size,
        workers=workers,
        pin_memory=pin,
        # A last batch of one breaks batch norm at small image sizes; a full batch is
        # always kept.
        drop_last=len(train_samples) >= config.batch_size,
    )
    val_loader = make_loader(
        ImageDataset(val_samples, eval_transform(config.image_size)),
        EpochSampler(len(val_samples), seed=config.seed, shuffle=False),
        batch_size=config.batch_size,
        workers=workers,
        pin_memory=pin,
        drop_last=False,
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    log.info(
        "training %s%s on %s: %d train / %d val images, %d classes, %dx%d px, "
        "weights: %s, %d loader workers",
        arch,
        " (backbone frozen but its last stage)" if frozen else "",
        device,
        len(train_samples),
        len(val_samples),
        len(manifest.labels),
        config.image_size,
        config.image_size,
        initialisation,
        workers,
    )

    for epoch in range(start_epoch, config.epochs):
        train_sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        train_loss, train_acc, seen, waited = _train_epoch(
            model,
            _batches(train_loader, device, channels_last, arch),
            criterion,
            optimizer,
            scaler,
            autocast,
            device,
            frozen=frozen,
            desc=f"epoch {epoch + 1}/{config.epochs} train",
            total=len(train_loader),
            progress=config.progress,
        )
        train_seconds = time.perf_counter() - started
        val_loss, val_acc = _validate(
            model,
            _batches(val_loader, device, channels_last, arch),
            criterion,
            autocast,
            desc=f"epoch {epoch + 1}/{config.epochs} val",
            total=len(val_loader),
            progress=config.progress,
        )
        scheduler.step()
        stats = EpochStats(
            epoch=epoch + 1,
            lr=lr,
            train_loss=train_loss,
            train_accuracy=train_acc,
            val_loss=val_loss,
            val_accuracy=val_acc,
            images_per_s=seen / train_seconds,
            data_wait_fraction=waited / train_seconds,
            seconds=time.perf_counter() - started,
        )
        history.append(stats)
        improved = val_acc > best_accuracy
        if improved:
            best_accuracy, best_epoch = val_acc, epoch + 1
        common = _checkpoint_common(model, manifest, config, stats, initialisation)
        if improved:
            _save(out / BEST_NAME, common)
        _save(
            out / LAST_NAME,
            {
                **common,
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(),
                "scaler_state": scaler.state_dict(),
                "best_val_accuracy": best_accuracy,
                "best_epoch": best_epoch,
                "history": [asdict(row) for row in history],
            },
        )
        (out / HISTORY_NAME).write_text(
            json.dumps([asdict(row) for row in history], indent=2) + "\n"
        )
        log.info(
            "epoch %d/%d  lr %.5f  train loss %.4f acc %.4f  val loss %.4f acc %.4f  "
            "%.1f img/s (waiting for data %.0f%%)%s",
            epoch + 1,
            config.epochs,
            lr,
            train_loss,
            train_acc,
            val_loss,
            val_acc,
            stats.images_per_s,
            100 * stats.data_wait_fraction,
            "  * best" if improved else "",
        )

    log.info("best validation accuracy %.4f at epoch %d -> %s", best_accuracy, best_epoch,
             out / BEST_NAME)  # fmt: skip
    return TrainResult(
        best_checkpoint=out / BEST_NAME,
        last_checkpoint=out / LAST_NAME,
        best_epoch=best_epoch,
        best_val_accuracy=best_accuracy,
        history=history,
        initialisation=initialisation,
    )


def _read_resume(path: Path, manifest: Manifest, config: TrainConfig) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"resume checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint written by `training train`")
    if "optimizer_state" not in state:
        raise CheckpointError(f"{path} cannot resume training (use {LAST_NAME}, not {BEST_NAME})")
    if list(state["labels"]) != list(manifest.labels):
        raise CheckpointError(f"{path} was trained on labels {state['labels']}, not these")
    if int(state["image_size"]) != config.image_size:
        raise CheckpointError(
            f"{path} was trained at {state['image_size']} px; resume with that image size"
        )
    return state


def _checkpoint_common(
    model: nn.Module,
    manifest: Manifest,
    config: TrainConfig,
    stats: EpochStats,
    initialisation: str,
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": config.arch,
        "model_state": {
            key: value.detach().to("cpu", memory_format=torch.contiguous_format)
            for key, value in model.state_dict().items()
        },
        "labels": list(manifest.labels),
        "image_size": config.image_size,
        "epoch": stats.epoch,
        "val_accuracy": stats.val_accuracy,
        "val_loss": stats.val_loss,
        "initialisation": initialisation,
        "config": config.to_dict(),
    }


def _save(path: Path, payload: dict[str, Any]) -> None:
    # Written aside and renamed: an interrupted save never leaves a truncated checkpoint.
    partial = path.with_name(path.name + ".part")
    torch.save(payload, partial)
    partial.replace(path)


def _batches(
    loader: torch.utils.data.DataLoader[tuple[torch.Tensor, int]],
    device: torch.device,
    channels_last: bool,
    arch: Arch,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """(float input, labels, seconds spent waiting for the loader) per batch."""
    iterator = iter(loader)
    while True:
        asked = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            return
        waited = time.perf_counter() - asked
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield normalize(images, arch), labels.to(device, non_blocking=True), waited


def _train_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, float]],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    autocast: AutocastFactory,
    device: torch.device,
    *,
    frozen: Sequence[nn.Module] = (),
    desc: str,
    total: int,
    progress: bool,
) -> tuple[float, float, int, float]:
    """One pass over the training set: (mean loss, accuracy, images, seconds waiting).
    The `frozen` modules stay in eval mode (their batch-norm statistics are kept)."""
    model.train()
    for module in frozen:
        module.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, waited = 0, 0.0
    with tqdm(batches, desc=desc, total=total, unit="batch", disable=not progress) as bar:
        for step, (images, labels, wait) in enumerate(bar, start=1):
            waited += wait
            with autocast():
                logits = model(images)
                loss = criterion(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # Sums stay on the device: reading them every step would stall the GPU.
            loss_sum += loss.detach().float() * labels.numel()
            correct += (logits.detach().argmax(dim=1) == labels).sum()
            seen += labels.numel()
            if step % 20 == 0 or step == total:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.3f}"
                )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if seen == 0:
        return math.nan, math.nan, 0, waited
    return loss_sum.item() / seen, correct.item() / seen, seen, waited


@torch.no_grad()
def _validate(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, float]],
    criterion: nn.Module,
    autocast: AutocastFactory,
    *,
    desc: str,
    total: int,
    progress: bool,
) -> tuple[float, float]:
    """Mean loss and accuracy over the validation set, in eval mode."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for images, labels, _ in tqdm(
        batches, desc=desc, total=total, unit="batch", disable=not progress, leave=False
    ):
        with autocast():
            logits = model(images)
        loss_sum += float(criterion(logits.float(), labels)) * labels.numel()
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += labels.numel()
    return loss_sum / seen, correct / seen
