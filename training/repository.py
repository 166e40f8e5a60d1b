"""Triton model repositories: configs rendered from one template, versions written safely.

Two repositories serve the same model name and I/O (DESIGN.md, "Model contract"):
`<root>/gpu/category_classifier` (onnxruntime backend, TensorRT FP16) for production and
`<root>/cpu/category_classifier` (Python backend running the same ONNX file with
onnxruntime) for development and CI. Their `config.pbtxt` files are produced by
`render_config`; the committed ones are its output for the defaults.

- `render_config(kind, num_classes=..., image_size=..., parameters=...)` returns
  config.pbtxt text; `kind` "gpu-plan" is the GPU repository serving a TensorRT plan.
- `threshold_parameters(threshold_json)` reads evaluate's threshold.json into the model
  parameter `confidence_threshold`, which the consumer reads from Triton's model config.
- `add_version(root, kind, onnx_path, labels, image_size=..., parameters=...)` writes the
  next numbered version and returns its number. It raises `OnnxContractError` (from
  training.model) when the file breaks the contract, `ValueError` when it disagrees with
  `labels` or `image_size`, and `FileExistsError` rather than overwrite a version.
- `latest_version(root, kind)` returns the highest version number or None.
- `python -m training.repository bootstrap` gives both repositories a version 1 when the
  CPU one has none (what `make stack` runs); `render` rewrites the committed configs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, Literal, get_args

from training.model import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LABELS,
    INPUT_NAME,
    OUTPUT_NAME,
    build_model,
    export_onnx,
    format_labels,
    read_labels,
    read_onnx_contract,
)

# Named explicitly: under `python -m` this module's __name__ is __main__.
logger = logging.getLogger("training.repository")

Kind = Literal["cpu", "gpu"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
# What a config can serve: a repository's kind, or the GPU repository's TensorRT plan.
ConfigKind = Literal["cpu", "gpu", "gpu-plan"]
CONFIG_KINDS: Final[tuple[ConfigKind, ...]] = get_args(ConfigKind)
MODEL_NAME: Final = "category_classifier"
DEFAULT_MAX_BATCH_SIZE: Final = 64
# Where the GPU server keeps built TensorRT engines; deployments mount a volume here so a
# restart does not rebuild them (minutes).
DEFAULT_TRT_CACHE_DIR: Final = "/var/cache/triton/tensorrt"
# Two intra-op threads: the development box has two cores.
DEFAULT_CPU_THREADS: Final = 2
COMMITTED_ROOT: Final = Path(__file__).resolve().parents[1] / "model_repository"
PYTHON_MODEL_SOURCE: Final = "onnx_model.py"
LABELS_FILE: Final = "labels.txt"
CONFIG_FILE: Final = "config.pbtxt"
# The model parameter that carries evaluate's recommended threshold to the consumer.
CONFIDENCE_THRESHOLD_PARAMETER: Final = "confidence_threshold"
# The model parameter that says in words what the version is (zero-shot, trained, random).
DESCRIPTION_PARAMETER: Final = "model_description"
BootstrapModel = Literal["zero-shot", "random"]

_HEADERS: Final[dict[ConfigKind, str]] = {
    "gpu": """\
# Production repository: the exported ONNX graph on GPU through the onnxruntime backend,
# with the TensorRT execution accelerator in FP16. Rendered by training/repository.py
# (render_config); change the template there and run `python -m training.repository render`.
""",
    "gpu-plan": """\
# Production repository, TensorRT plan: the FP16 engine built from this version's
# model.onnx on the serving GPU by `python -m training tensorrt`. The next export writes
# the ONNX Runtime config back. Rendered by training/repository.py (render_config).
""",
    "cpu": """\
# Development and CI repository: the same name, I/O and ONNX file as the production one,
# served by the Python backend (onnx_model.py, copied to <version>/model.py) with
# onnxruntime on CPU. Rendered by training/repository.py (render_config); change the
# template there and run `python -m training.repository render`.
""",
}
_SERVING: Final[dict[ConfigKind, str]] = {
    "gpu": 'platform: "onnxruntime_onnx"\nbackend: "onnxruntime"\n',
    "gpu-plan": 'platform: "tensorrt_plan"\n',
    "cpu": 'backend: "python"\n',
}
# A parameter key or value goes into a quoted pbtxt string unescaped.
_PARAMETER_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_PARAMETER_VALUE = re.compile(r"[^\"\\\x00-\x1f\x7f]*")


def render_config(
    kind: ConfigKind,
    *,
    num_classes: int = len(DEFAULT_LABELS),
    image_size: int = DEFAULT_IMAGE_SIZE,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    trt_cache_dir: str = DEFAULT_TRT_CACHE_DIR,
    cpu_threads: int = DEFAULT_CPU_THREADS,
    parameters: Mapping[str, str] | None = None,
) -> str:
    """The config.pbtxt of `kind` for a model with `num_classes` outputs and S = image_size.

    `kind`: "cpu" (Python backend), "gpu" (onnxruntime backend with the TensorRT
    accelerator) or "gpu-plan" (a TensorRT plan built by training/tensorrt.py); all three
    have the same name and I/O. `parameters` become model-level string parameters that
    clients read from the model config (such as `confidence_threshold`); without them the
    output is the committed config. Raises ValueError on a bad size, an unknown kind, or a
    parameter that is not a plain key and value or that repeats one the template sets.
    """
    if kind not in CONFIG_KINDS:
        raise ValueError(f"kind must be one of {CONFIG_KINDS}, got {kind!r}")
    if num_classes < 1 or image_size < 1 or max_batch_size < 1 or cpu_threads < 1:
        raise ValueError("num_classes, image_size, max_batch_size and cpu_threads must be >= 1")
    model_parameters = {"intra_op_thread_count": str(cpu_threads)} if kind == "cpu" else {}
    for key, value in (parameters or {}).items():
        if not _PARAMETER_KEY.fullmatch(key) or not _PARAMETER_VALUE.fullmatch(value):
            raise ValueError(f"parameter {key!r}: {value!r} needs quoting; use plain text")
        if key in model_parameters:
            raise ValueError(f"parameter {key!r} is set by the {kind} template")
        model_parameters[key] = value
    dims = f"[ {image_size}, {image_size}, 3 ]"
    text = (
        _HEADERS[kind]
        + f'name: "{MODEL_NAME}"\n'
        + _SERVING[kind]
        + f"""\
max_batch_size: {max_batch_size}
version_policy: {{ latest: {{ num_versions: 1 }} }}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_UINT8
    dims: {dims}
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "{LABELS_FILE}"
  }}
]
"""
    )
    if kind == "cpu":
        text += _instance_group("KIND_CPU") + _dynamic_batching(
            (8, 16, 32), max_batch_size, delay_us=5000
        )
    else:
        text += _instance_group("KIND_GPU") + _dynamic_batching(
            (32, 64), max_batch_size, delay_us=1000
        )
    if kind == "gpu":
        text += _tensorrt_accelerator(image_size, max_batch_size, trt_cache_dir)
    if kind != "cpu":
        text += f"""\
model_warmup [
  {{
    name: "zeros"
    batch_size: 1
    inputs {{
      key: "{INPUT_NAME}"
      value: {{
        data_type: TYPE_UINT8
        dims: {dims}
        zero_data: true
      }}
    }}
  }}
]
"""
    return text + "".join(
        f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{value}" }}\n}}\n'
        for key, value in model_parameters.items()
    )


def _tensorrt_accelerator(image_size: int, max_batch_size: int, cache_dir: str) -> str:
    opt_batch = min(32, max_batch_size)
    shape = f"{image_size}x{image_size}x3"
    trt = {
        "precision_mode": "FP16",
        "max_workspace_size_bytes": str(1 << 30),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": cache_dir,
        # One explicit profile over every batch size Triton may form, so TensorRT
        # builds one engine up front instead of rebuilding as larger batches appear.
        "trt_profile_min_shapes": f"{INPUT_NAME}:1x{shape}",
        "trt_profile_opt_shapes": f"{INPUT_NAME}:{opt_batch}x{shape}",
        "trt_profile_max_shapes": f"{INPUT_NAME}:{max_batch_size}x{shape}",
    }
    trt_parameters = "".join(
        f'        parameters {{ key: "{key}" value: "{value}" }}\n' for key, value in trt.items()
    )
    return f"""\
optimization {{
  execution_accelerators {{
    gpu_execution_accelerator: [
      {{
        name: "tensorrt"
{trt_parameters}      }}
    ]
  }}
}}
# The engine is built while loading, so the model turns ready only when it can serve.
"""


def _instance_group(kind: str) -> str:
    return f"""\
instance_group [
  {{
    count: 1
    kind: {kind}
  }}
]
"""


def _dynamic_batching(preferred: Sequence[int], max_batch_size: int, *, delay_us: int) -> str:
    sizes = [size for size in preferred if size <= max_batch_size]
    preferred_line = f"  preferred_batch_size: [ {', '.join(map(str, sizes))} ]\n" if sizes else ""
    return f"dynamic_batching {{\n{preferred_line}  max_queue_delay_microseconds: {delay_us}\n}}\n"


def threshold_parameters(threshold_json: Path) -> dict[str, str]:
    """`{"confidence_threshold": "<t>"}` from a threshold.json written by evaluate.

    The value is written so that it reads back as the same float. Raises ValueError when
    the file holds no number in [0, 1] under `confidence_threshold`, OSError when it cannot
    be read.
    """
    recorded = json.loads(Path(threshold_json).read_text(encoding="utf-8"))
    value = recorded.get(CONFIDENCE_THRESHOLD_PARAMETER) if isinstance(recorded, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(
            f"{threshold_json}: {CONFIDENCE_THRESHOLD_PARAMETER} must be a number in [0, 1], "
            f"got {value!r}"
        )
    return {CONFIDENCE_THRESHOLD_PARAMETER: repr(float(value))}


def served_description(repo_root: Path, kind: Kind) -> str | None:
    """The `model_description` parameter of the model's config.pbtxt (None without one)."""
    config = model_dir(repo_root, kind) / CONFIG_FILE
    if not config.is_file():
        return None
    found = re.search(
        rf'key: "{DESCRIPTION_PARAMETER}"\s*value: {{ string_value: "([^"]*)" }}',
        config.read_text(encoding="utf-8"),
    )
    return found.group(1) if found else None


def model_dir(repo_root: Path, kind: Kind) -> Path:
    """`<repo_root>/<kind>/category_classifier`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return Path(repo_root) / kind / MODEL_NAME


def latest_version(repo_root: Path, kind: Kind) -> int | None:
    """The highest numbered version directory of the model, or None when there is none."""
    directory = model_dir(repo_root, kind)
    if not directory.is_dir():
        return None
    versions = [
        int(entry.name)
        for entry in directory.iterdir()
        if entry.is_dir() and entry.name.isdigit() and int(entry.name) > 0
    ]
    return max(versions, default=None)


def add_version(
    repo_root: Path,
    kind: Kind,
    onnx_path: Path,
    labels: Sequence[str],
    *,
    image_size: int,
    extra_files: Mapping[str, Path] | None = None,
    version: int | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    parameters: Mapping[str, str] | None = None,
) -> int:
    """Write `onnx_path` as a new version of the model in `<repo_root>/<kind>` and return it.

    The version is `version` or the next number after the latest. Its directory holds
    `model.onnx` (plus `model.py` for `cpu`, copied from `onnx_model.py`) and `extra_files`
    (name in the version directory -> source). It is assembled beside the repository and
    renamed into place, so a server polling the repository never loads half a version.
    `labels.txt` and `config.pbtxt` at the model level are rewritten when they change;
    the config carries `parameters` (see render_config), which belong to this version.
    """
    labels_text = format_labels(labels)
    # Rendered first: a bad parameter fails before anything is written.
    config_text = render_config(
        kind,
        num_classes=len(labels),
        image_size=image_size,
        max_batch_size=max_batch_size,
        parameters=parameters,
    )
    contract = read_onnx_contract(onnx_path)
    if contract.image_size != image_size:
        raise ValueError(f"{onnx_path} takes {contract.image_size} px images, not {image_size}")
    if contract.num_classes != len(labels):
        raise ValueError(
            f"{onnx_path} has {contract.num_classes} outputs but {len(labels)} labels were given"
        )
    files: dict[str, Path] = {"model.onnx": Path(onnx_path)}
    if kind == "cpu":
        files["model.py"] = _python_model_source(repo_root)
    for name, source in (extra_files or {}).items():
        if name in files or Path(name).name != name or name.startswith("."):
            raise ValueError(f"extra file name {name!r} is not a plain, new file name")
        files[name] = Path(source)

    directory = model_dir(repo_root, kind)
    directory.mkdir(parents=True, exist_ok=True)
    number = version if version is not None else (latest_version(repo_root, kind) or 0) + 1
    if number < 1:
        raise ValueError(f"version must be >= 1, got {number}")
    target = directory / str(number)
    if target.exists():
        raise FileExistsError(f"{target} exists; versions are never overwritten")
    # Staged in the repository root, which the server does not scan (it serves <root>/<kind>),
    # and on the same file system, so the rename below is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}-{MODEL_NAME}-{number}-", dir=repo_root))
    try:
        for name, source in files.items():
            shutil.copyfile(source, staging / name)
            (staging / name).chmod(0o644)
        staging.chmod(0o755)
        if target.exists():
            raise FileExistsError(f"{target} appeared while version {number} was being written")
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    # The version first, then labels and config. A poll that falls in between sees the
    # new version with the old config: if the I/O changed, that load fails and the server
    # keeps the old version; either way the next poll reloads the model with the new
    # config. Config first would reload the old version under the new config, which
    # fails, or carries the new version's parameters, while nothing newer is there. (A
    # reload that fails leaves the loaded model as it was.)
    _write_if_changed(directory / LABELS_FILE, labels_text)
    _write_if_changed(directory / CONFIG_FILE, config_text)
    logger.info("wrote %s (%d classes, %d px)", target, len(labels), image_size)
    return number


def _python_model_source(repo_root: Path) -> Path:
    local = model_dir(repo_root, "cpu") / PYTHON_MODEL_SOURCE
    return local if local.is_file() else model_dir(COMMITTED_ROOT, "cpu") / PYTHON_MODEL_SOURCE


def _write_if_changed(path: Path, text: str) -> None:
    # An unchanged file keeps its mtime: a polling server reloads a model whose files change.
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def bootstrap(
    repo_root: Path = COMMITTED_ROOT,
    *,
    model: BootstrapModel = "zero-shot",
    checkpoint: Path | None = None,
    labels: Sequence[str] = DEFAULT_LABELS,
    image_size: int = DEFAULT_IMAGE_SIZE,
) -> dict[Kind, int | None]:
    """Give both repositories a first version when the CPU one has none.

    Returns the latest version of each repository afterwards (None: it has none). The
    first version is the zero-shot cold-start model (training/zero_shot.py, 224 px, its
    recommended threshold in the config) unless `model` is "random": a randomly initialised
    ResNet-34 at `image_size` (build_model warns; enough to run the pipeline end to end),
    or the given training `checkpoint` (a state_dict of ResNet-34 with `labels`).
    """
    existing = latest_version(repo_root, "cpu")
    if existing is not None:
        logger.info(
            "%s already has version %d; nothing to do", model_dir(repo_root, "cpu"), existing
        )
        return {kind: latest_version(repo_root, kind) for kind in KINDS}
    if model == "zero-shot" and checkpoint is None:
        from training.zero_shot import zero_shot_onnx

        onnx_path, parameters = zero_shot_onnx(labels)
        size = read_onnx_contract(onnx_path).image_size
        return {
            kind: add_version(repo_root, kind, onnx_path, labels, image_size=size,
                              parameters=parameters)
            for kind in KINDS
        }  # fmt: skip
    built = build_model(len(labels), weights=checkpoint)
    description = (
        f"ResNet-34 from checkpoint {checkpoint.name}"
        if checkpoint is not None
        else "RANDOMLY INITIALISED ResNet-34: arbitrary categories, for pipeline tests only"
    )
    served: dict[Kind, int | None] = {}
    with tempfile.TemporaryDirectory(prefix="category-classifier-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(built, onnx_path, image_size=image_size)
        for kind in KINDS:
            served[kind] = add_version(
                repo_root,
                kind,
                onnx_path,
                labels,
                image_size=image_size,
                parameters={DESCRIPTION_PARAMETER: description},
            )
    return served


def committed_config(kind: Kind) -> str:
    """The config.pbtxt committed for `kind`: the cold-start model's, the one `bootstrap`
    serves on a fresh clone, so that `make run` leaves the committed files as they are."""
    from training.zero_shot import IMAGE_SIZE, served_parameters

    return render_config(kind, image_size=IMAGE_SIZE, parameters=served_parameters())


def render_committed(repo_root: Path = COMMITTED_ROOT) -> None:
    """Rewrite the committed configs and labels from the defaults."""
    for kind in KINDS:
        directory = model_dir(repo_root, kind)
        directory.mkdir(parents=True, exist_ok=True)
        _write_if_changed(directory / CONFIG_FILE, committed_config(kind))
        _write_if_changed(directory / LABELS_FILE, format_labels(DEFAULT_LABELS))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.repository",
        description="Give the Triton repositories a first version, or re-render their configs.",
    )
    parser.add_argument("--repository", type=Path, default=COMMITTED_ROOT, help="repository root")
    commands = parser.add_subparsers(dest="command", required=True)
    boot = commands.add_parser(
        "bootstrap",
        help="add version 1 when the CPU repository has none: the zero-shot cold-start model",
    )
    boot.add_argument(
        "--random",
        action="store_true",
        help="a randomly initialised ResNet-34 instead (arbitrary answers; pipeline tests)",
    )
    boot.add_argument("--checkpoint", type=Path, help="a ResNet-34 training checkpoint instead")
    boot.add_argument("--labels", type=Path, help="labels file, one class per line")
    boot.add_argument(
        "--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="of --random or --checkpoint"
    )
    commands.add_parser("render", help="rewrite the committed configs from the template")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The ONNX exporter's optimiser reports every pass at INFO.
    for noisy in ("onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "render":
        render_committed(args.repository)
        return 0
    labels = read_labels(args.labels) if args.labels else list(DEFAULT_LABELS)
    served = bootstrap(
        args.repository,
        model="random" if args.random else "zero-shot",
        checkpoint=args.checkpoint,
        labels=labels,
        image_size=args.image_size,
    )
    for kind, number in served.items():
        logger.info("%s repository: latest version %s", kind, number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
