"""`python -m bench`: measure the real stack against a naive consumer and the ceilings.

    python -m bench                  # the full benchmark (make bench), about 10 minutes
    python -m bench --quick          # shorter runs, rougher numbers
    python -m bench --smoke          # seconds per phase: checks the harness works, no verdicts
    python -m bench --phases service,soak --soak-minutes 10     # make bench-soak

Phases, in order: `ceiling` (Triton alone, decode alone), `naive`, `service` (max
throughput, then 50 % of it for latency), `soak` (only with --soak-minutes), `overhead`
(identity model, tiny images, no origin latency). The harness starts its own Kafka broker,
Triton server(s) and image origin on free loopback ports in a temporary folder, so it never
touches `make stack` or a test run; `--kafka-bootstrap` uses an existing broker instead
(only topics named `bench.*` are created there).

Results: bench/results/bench-<time>.json and .md (also copied to latest.json and latest.md),
the processes' logs in bench/results/logs-<time>/, and a summary on stdout with the four
comparisons and one PASS/FAIL line per target. Exit status 0 when the harness ran (a missed
target is reported, not an error; `--strict` makes a FAIL exit 1), 1 when it could not.

GPU profile: `--profile gpu` measures a Triton server that already serves
model_repository/gpu (the pytriton wheel has no GPU backends), given by `--triton-url`
and `--triton-metrics-url` (and `--triton-pid` when it runs on this machine, for its CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ceiling as ceil
from bench import parts, report
from bench.pyspy import PySpyError
from bench.runs import RunContext, RunResult, run_backlog, run_paced
from bench.stack import (
    IMAGE_SIZE,
    REPO_ROOT,
    BenchStack,
    TritonEndpoint,
    cold_start_onnx,
    cpu_repository,
    identity_repository,
    random_model_onnx,
)
from bench.workload import describe, listing_photos, tiny_photos
from devstack.process import StackError

PHASES = ("ceiling", "naive", "service", "soak", "overhead")
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results"


@dataclass(frozen=True)
class Mode:
    """How long each phase runs."""

    name: str
    photos: int
    decode_s: float
    triton_points: tuple[tuple[int, int], ...]
    triton_s: float
    naive_s: float
    naive_events: int
    service_s: float
    service_min_events: int
    half_s: float
    warmup_s: float
    overhead_events: int
    overhead_s: float


MODES = {
    "full": Mode(
        "full",
        photos=64,
        decode_s=10,
        triton_points=((1, 16), (8, 4), (16, 2), (32, 1), (32, 2), (32, 4)),
        triton_s=6,
        naive_s=40,
        naive_events=2000,
        service_s=60,
        service_min_events=1000,
        half_s=60,
        warmup_s=5,
        overhead_events=30_000,
        overhead_s=60,
    ),
    "quick": Mode(
        "quick",
        photos=32,
        decode_s=5,
        triton_points=((16, 2), (32, 2)),
        triton_s=4,
        naive_s=20,
        naive_events=1000,
        service_s=25,
        service_min_events=400,
        half_s=25,
        warmup_s=3,
        overhead_events=8_000,
        overhead_s=30,
    ),
    "smoke": Mode(
        "smoke",
        photos=8,
        decode_s=1,
        triton_points=((8, 1),),
        triton_s=1,
        naive_s=20,
        naive_events=8,
        service_s=60,
        service_min_events=30,
        half_s=4,
        warmup_s=0,
        overhead_events=60,
        overhead_s=60,
    ),
}


class Console:
    """Progress lines with the time since the start, flushed at once."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self._started)
        print(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {message}", flush=True)


def _machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_before": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _commit() -> str:
    result = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "unknown"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service against a naive consumer and the ceilings.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter runs (about 4 minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny runs; checks the harness only")
    parser.add_argument(
        "--phases",
        default="ceiling,naive,service,overhead",
        help=f"comma-separated subset of {','.join(PHASES)} (soak also needs --soak-minutes)",
    )
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder")
    parser.add_argument("--profile", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument(
        "--repository",
        type=Path,
        help="CPU profile: a model repository root to serve instead of a random model",
    )
    parser.add_argument("--onnx", type=Path, help="CPU profile: serve this ONNX file")
    parser.add_argument("--triton-url", help="use this Triton (gRPC host:port) as it is")
    parser.add_argument("--triton-metrics-url", help="its metrics page (with --triton-url)")
    parser.add_argument("--triton-pid", type=int, help="its pid, for CPU time (optional)")
    parser.add_argument("--kafka-bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--origin-latency-ms", type=float, default=40.0)
    parser.add_argument("--origin-jitter-ms", type=float, default=20.0)
    parser.add_argument("--origin-mbps", type=float, default=0.0, help="0: no bandwidth cap")
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra SUGGESTER_* setting for the service (repeatable)",
    )
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="profile the service with py-spy in every run (logs folder; needs py-spy)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    if "soak" in phases and args.soak_minutes <= 0:
        parser.error("the soak phase needs --soak-minutes")
    if args.soak_minutes > 0 and "soak" not in phases:
        phases.append("soak")
    args.phase_list = [p for p in PHASES if p in phases]
    if args.profile == "gpu" and not (args.triton_url and args.triton_metrics_url):
        parser.error(
            "--profile gpu measures a running GPU Triton: give --triton-url and "
            "--triton-metrics-url (see bench/PERFORMANCE.md)"
        )
    if bool(args.triton_url) != bool(args.triton_metrics_url):
        parser.error("--triton-url and --triton-metrics-url go together")
    for item in args.service_env:
        if "=" not in item or not item.startswith("SUGGESTER_"):
            parser.error(f"--service-env {item!r}: expected SUGGESTER_KEY=VALUE")
    return args


class Bench:
    """One invocation: sets the stack up, runs the phases, writes the results."""

    def __init__(self, args: argparse.Namespace, say: Console) -> None:
        self.args = args
        self.say = say
        self.mode = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
        self.stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.out: Path = args.out
        self.log_dir = self.out / f"logs-{self.stamp}"
        self.cache_dir = DEFAULT_RESULTS / ".cache"
        self.runs: dict[str, RunResult] = {}
        self.ceiling: dict[str, Any] | None = None
        self.decode_tiny_ms: float | None = None
        self.parts: dict[str, Any] = {}
        self.workload: dict[str, Any] = {}
        overrides = dict(item.split("=", 1) for item in args.service_env)
        self.service_overrides: dict[str, str] = overrides

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        machine = _machine()
        workdir = Path(tempfile.mkdtemp(prefix="bench-"))
        say = self.say
        say(
            f"benchmark ({self.mode.name}, profile {self.args.profile}, phases "
            f"{','.join(self.args.phase_list)}) on {machine['cores']} x {machine['cpu']}, "
            f"load {machine['load_before']}; work folder {workdir}"
        )
        try:
            with BenchStack(workdir) as stack:
                self._run_phases(stack, workdir)
        finally:
            if self.args.keep_workdir:
                say(f"work folder kept: {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
        machine["load_after"] = _loadavg()
        return self._write(machine)

    def _run_phases(self, stack: BenchStack, workdir: Path) -> None:
        say, mode, args = self.say, self.mode, self.args
        phases = args.phase_list
        say("workload: generating (or reading cached) listing photos")
        photos = listing_photos(mode.photos, cache_dir=self.cache_dir)
        tiny = tiny_photos(16)
        origin_dir = workdir / "origin"
        for photo in [*photos, *tiny]:
            path = origin_dir / photo.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(photo.data)
        self.workload = describe(photos)
        say(f"workload: {self.workload}")

        bootstrap = stack.start_kafka(args.kafka_bootstrap)
        say(f"kafka: {bootstrap}" + (" (external)" if args.kafka_bootstrap else ""))
        origin = stack.start_origin(
            origin_dir,
            latency_ms=args.origin_latency_ms,
            jitter_ms=args.origin_jitter_ms,
            mbps=args.origin_mbps,
        )
        say(
            f"origin: {origin.host_port}, latency {args.origin_latency_ms:g} +- "
            f"{args.origin_jitter_ms:g} ms, bandwidth "
            f"{f'{args.origin_mbps:g} Mbit/s' if args.origin_mbps else 'uncapped'}"
        )
        model_phases = {"ceiling", "naive", "service", "soak"} & set(phases)
        if model_phases:
            triton = self._model_triton(stack, workdir)
            say(f"triton: {triton.description} at {triton.grpc_url}")
            ctx = RunContext(
                stack,
                triton,
                [origin.url(p.name) for p in photos],
                self.service_overrides,
                self.log_dir,
                say,
                self.args.py_spy,
            )
            if "ceiling" in phases:
                self._ceiling(triton, [origin_dir / p.name for p in photos])
                if self._measures_the_default_model():
                    self._cold_start(stack, workdir)
            if "naive" in phases:
                self.runs["naive"] = run_backlog(
                    ctx, "naive", "naive", events=mode.naive_events, max_seconds=mode.naive_s
                )
                self._said(self.runs["naive"])
            if "service" in phases or "soak" in phases:
                self._service(ctx)
            if "soak" in phases:
                self._soak(ctx)
            stack.stop_tritons()
        if "overhead" in phases:
            self._overhead(stack, workdir, [origin.url(p.name) for p in tiny], tiny)

    def _model_triton(self, stack: BenchStack, workdir: Path) -> TritonEndpoint:
        args = self.args
        if args.triton_url:
            return TritonEndpoint(
                args.triton_url, args.triton_metrics_url, args.triton_pid,
                f"external Triton ({args.profile})",
            )  # fmt: skip
        if args.repository:
            return stack.start_triton(args.repository.resolve(), "model")
        onnx = args.onnx
        if onnx is None:
            self.say("model: exporting a seeded random ResNet-34 (cached after the first run)")
            onnx = random_model_onnx(self.cache_dir)
        repository = cpu_repository(workdir, onnx.resolve())
        self.say("triton: starting the CPU repository (Python backend, onnxruntime)")
        return stack.start_triton(repository, "model")

    def _measures_the_default_model(self) -> bool:
        """Whether the model phases serve the random ResNet-34 at 112 px on a local CPU
        Triton: the reference the cold-start model's cost is compared with."""
        args = self.args
        return args.profile == "cpu" and not (args.triton_url or args.repository or args.onnx)

    def _cold_start(self, stack: BenchStack, workdir: Path) -> None:
        """Triton CPU per image of the cold-start model at the reference's best point."""
        say, mode = self.say, self.mode
        assert self.ceiling is not None
        best = self.ceiling["triton_best"]
        say("[ceiling] cold-start model: building (cached after the first run) and serving it")
        repository = cpu_repository(workdir / "cold-start", cold_start_onnx())
        triton = stack.start_triton(repository, "cold-start")
        try:
            size = ceil.served_image_size(triton.grpc_url)
            point = ceil.triton_ceiling(
                triton.grpc_url,
                triton.metrics_url,
                triton.pid,
                size=size,
                points=[(best["batch"], best["concurrency"])],
                seconds=mode.triton_s,
                progress=say,
            )[0]
        finally:
            stack.stop_last_triton()
        reference = best["triton_cpu_ms_per_image"]
        measured = point.triton_cpu_ms_per_image
        ratio = measured / reference if measured is not None and reference else None
        self.ceiling["cold_start"] = {
            "model": "zero-shot EfficientNet-Lite0 (make stack's cold-start model)",
            "image_size": size,
            "point": ceil.as_dict(point),
            "reference": f"random ResNet-34 at {IMAGE_SIZE} px",
            "reference_cpu_ms_per_image": reference,
            "cpu_ratio": ratio,
            "max_cpu_ratio": ceil.COLD_START_MAX_CPU_RATIO,
        }
        shown = "n/a" if ratio is None else f"{ratio:.2f}x"
        say(
            f"[ceiling] cold-start model ({size} px): {point.images_per_s:.1f} images/s, "
            f"Triton CPU {_ms(measured)} ms/image vs ResNet-34 at {IMAGE_SIZE} px "
            f"{_ms(reference)} ms/image: {shown} (target <= "
            f"{ceil.COLD_START_MAX_CPU_RATIO:g}x)"
        )

    def _ceiling(self, triton: TritonEndpoint, paths: list[Path]) -> None:
        say, mode = self.say, self.mode
        # The served model's S: preprocessing and requests must fit it.
        size = ceil.served_image_size(triton.grpc_url)
        say(f"[ceiling] decode alone: {mode.decode_s:g} s on every core")
        decode = ceil.decode_ceiling(paths, size=size, seconds=mode.decode_s)
        say(
            f"[ceiling] decode alone: {decode.images_per_s:.1f} images/s "
            f"({decode.processes} processes, {decode.cpu_ms_per_image:.2f} CPU ms/image)"
        )
        say(f"[ceiling] Triton alone: {len(mode.triton_points)} points of {mode.triton_s:g} s")
        points = ceil.triton_ceiling(
            triton.grpc_url,
            triton.metrics_url,
            triton.pid,
            size=size,
            points=mode.triton_points,
            seconds=mode.triton_s,
            progress=say,
        )
        best = max(points, key=lambda p: p.images_per_s)
        if self.args.profile == "gpu":
            bound = min(best.images_per_s, decode.images_per_s)
            formula = "min(T, D) (inference on the GPU, decoding on the CPU)"
        else:
            bound = ceil.combined_bound(best.images_per_s, decode.images_per_s)
            formula = "1/(1/T + 1/D)"
        self.ceiling = {
            "triton_points": [ceil.as_dict(p) for p in points],
            "triton_best": ceil.as_dict(best),
            "decode": ceil.as_dict(decode),
            "bound": bound,
            "bound_formula": formula,
        }
        say(
            f"[ceiling] T = {best.images_per_s:.1f}/s (batch {best.batch} x "
            f"{best.concurrency}), D = {decode.images_per_s:.1f}/s, bound {formula} = "
            f"{bound:.1f}/s"
        )

    def _service(self, ctx: RunContext) -> None:
        mode = self.mode
        guess = self.ceiling["bound"] if self.ceiling else 50.0
        events = max(mode.service_min_events, int(guess * mode.service_s))
        if self.args.smoke:
            events = mode.service_min_events
        self.runs["service"] = run_backlog(
            ctx, "service", "service", events=events, max_seconds=mode.service_s * 2.5
        )
        self._said(self.runs["service"])
        if "service" not in self.args.phase_list:
            return
        rate = max(1.0, self.runs["service"].events_per_s * 0.5)
        if self.args.smoke:
            rate = 5.0
        self.runs["service-50"] = run_paced(
            ctx,
            "service-50",
            "service",
            rate=rate,
            seconds=mode.half_s,
            warmup_s=mode.warmup_s,
        )
        self._said(self.runs["service-50"])

    def _soak(self, ctx: RunContext) -> None:
        service = self.runs.get("service")
        # Saturated: events come 10 % faster than the measured maximum, so the consumer
        # works at its limit (and its in-flight cap) for the whole soak.
        rate = max(1.0, (service.events_per_s if service else 20.0) * 1.1)
        minutes = self.args.soak_minutes
        self.say(f"[soak] {minutes:g} minutes at {rate:.1f} events/s offered (saturated)")
        self.runs["soak"] = run_paced(
            ctx,
            "soak",
            "service",
            rate=rate,
            seconds=minutes * 60,
            warmup_s=self.mode.warmup_s,
            drain_s=5,
            rss_every_s=10,
        )
        self._said(self.runs["soak"])

    def _overhead(self, stack: BenchStack, workdir: Path, urls: list[str], tiny: list[Any]) -> None:
        say, mode = self.say, self.mode
        self.decode_tiny_ms = (
            ceil.decode_cpu_per_image([p.data for p in tiny], size=IMAGE_SIZE, repeat=2000) * 1000
        )
        say(f"[overhead] decoding a tiny image costs {self.decode_tiny_ms * 1000:.0f} us of CPU")
        assert stack.origin is not None
        stack.origin.configure(latency_ms=0, jitter_ms=0, mbps=0)
        requests = {"full": 3000, "quick": 1000, "smoke": 100}[mode.name]
        self.parts = {
            "fetch_us_by_concurrency": parts.fetch_cpu_us(
                urls[0], stack.origin.host_port, (64, 8), requests
            ),
            **parts.codec_cpu_us(),
            "decode_tiny_us": round(self.decode_tiny_ms * 1000, 1),
        }
        fetch = ", ".join(
            f"{us:.0f} us at {c} in flight"
            for c, us in self.parts["fetch_us_by_concurrency"].items()
        )
        say(
            f"[overhead] piecewise CPU per event in the harness: fetch {fetch}; event decode "
            f"{self.parts['event_decode']:.0f} us; suggestion build+encode "
            f"{self.parts['suggestion_encode']:.0f} us"
        )
        say("[overhead] triton: starting the identity model (model_repository/cpu-identity)")
        triton = stack.start_triton(identity_repository(workdir), "identity")
        ctx = RunContext(
            stack, triton, urls, self.service_overrides, self.log_dir, say, self.args.py_spy
        )
        self.runs["overhead"] = run_backlog(
            ctx,
            "overhead",
            "service",
            events=mode.overhead_events,
            max_seconds=mode.overhead_s,
        )
        self._said(self.runs["overhead"])
        stack.stop_tritons()
        stack.origin.configure(
            latency_ms=self.args.origin_latency_ms,
            jitter_ms=self.args.origin_jitter_ms,
            mbps=self.args.origin_mbps,
        )

    def _said(self, result: RunResult) -> None:
        lat = result.latency_ms
        latency = (
            f"; latency p50/p95/p99/max {lat['p50']:.0f}/{lat['p95']:.0f}/{lat['p99']:.0f}/"
            f"{lat['max']:.0f} ms"
            if lat
            else ""
        )
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in result.cpu_ms_per_event.items())
        self.say(
            f"[{result.name}] {result.answered}/{result.events} answered "
            f"({result.dead_lettered} dead-lettered, {result.duplicates} duplicates) at "
            f"{result.events_per_s:.1f} events/s{latency}; CPU ms/event: {cpu}; consumer peak "
            f"RSS {result.consumer_peak_rss_mb:.0f} MB; Triton batch {result.triton_batch_size:.1f}"
        )

    def _write(self, machine: dict[str, Any]) -> int:
        verdicts = report.evaluate(
            self.runs,
            bound=self.ceiling["bound"] if self.ceiling else None,
            decode_tiny_ms=self.decode_tiny_ms,
        )
        comparison_lines = report.comparisons(self.runs, self.ceiling)
        document: dict[str, Any] = {
            "started_at": self.stamp,
            "mode": self.mode.name,
            "profile": self.args.profile,
            "command": "python -m bench " + shlex.join(sys.argv[1:]),
            "commit": _commit(),
            "machine": machine,
            "workload": self.workload,
            "origin": {
                "latency_ms": self.args.origin_latency_ms,
                "jitter_ms": self.args.origin_jitter_ms,
                "mbps": self.args.origin_mbps,
            },
            "service_overrides": self.service_overrides,
            "ceiling": self.ceiling,
            "decode_tiny_ms": self.decode_tiny_ms,
            "overhead_parts_cpu_us": self.parts,
            "runs": {name: r.as_dict() for name, r in self.runs.items()},
            "comparisons": comparison_lines,
            "targets": [v.__dict__ for v in verdicts],
        }
        json_path = self.out / f"bench-{self.stamp}.json"
        md_path = self.out / f"bench-{self.stamp}.md"
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        md_path.write_text(report.markdown(document, list(self.runs.values()), verdicts))
        shutil.copyfile(json_path, self.out / "latest.json")
        shutil.copyfile(md_path, self.out / "latest.md")

        print("\n== comparisons (same run) ==")
        for line in comparison_lines:
            print(line)
        title = "targets" + (" (smoke mode: informational only)" if self.args.smoke else "")
        print(f"\n== {title} ==")
        for verdict in verdicts:
            print(verdict.line())
        print(f"\nresults: {json_path}\n         {md_path}\nlogs:    {self.log_dir}", flush=True)
        failed = any(v.status == "FAIL" for v in verdicts)
        return 1 if failed and self.args.strict and not self.args.smoke else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    say = Console()
    try:
        return Bench(args, say).run()
    except (StackError, PySpyError) as exc:
        say(f"benchmark failed: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
