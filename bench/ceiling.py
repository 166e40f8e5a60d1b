"""The ceilings: what Triton alone and decoding alone can do on this machine.

- `triton_ceiling`: pre-resized uint8 tensors `[B, S, S, 3]` sent over gRPC by
  `concurrency` requests in flight, for each (B, concurrency) point of a sweep; the best
  point's images/s is T. Triton's CPU seconds per image at each point come from /proc.
- `decode_ceiling`: `category_suggester.preprocess.decode_image` (the service's decoder) over the
  benchmark photos in one process per core, images/s in total: D.
- `combined_bound(T, D)`: where both share the same cores, every image costs 1/T of the
  machine for inference and 1/D for decoding, so at most 1 / (1/T + 1/D) images/s.
- `decode_cpu_per_image`: CPU seconds one decode takes, single-threaded (used to take
  decoding out of the pipeline's cost per event in the overhead run).
- `served_image_size`: the S of the model a Triton serves, read from its model config.
- The CPU profile also measures the cold-start model `make stack` serves (zero-shot
  EfficientNet-Lite0, 224 px) at the best point of the benchmark model (a random ResNet-34
  at 112 px): its Triton CPU per image beside ResNet-34's (target: at most 2x).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio

from bench import procstat
from bench.tritonstats import inference_counts
from category_suggester.preprocess import decode_image

MODEL = "category_classifier"
MAX_PIXELS = 40_000_000
# The cold-start model's Triton CPU per image may be at most this multiple of ResNet-34's
# at 112 px (issue 13).
COLD_START_MAX_CPU_RATIO = 2.0


def served_image_size(url: str) -> int:
    """S of the served model's `image` input `[S, S, 3]`, from Triton's model config."""
    client = grpcclient.InferenceServerClient(url)
    try:
        config = client.get_model_config(MODEL, as_json=True)["config"]
    finally:
        client.close()
    return int(config["input"][0]["dims"][0])


@dataclass(frozen=True)
class TritonPoint:
    batch: int
    concurrency: int
    images_per_s: float
    requests: int
    triton_cpu_ms_per_image: float | None
    triton_batch_size: float


async def _drive(url: str, size: int, batch: int, concurrency: int, seconds: float) -> int:
    """Send requests for `seconds` (after a short warm-up); return images answered."""
    client = grpcaio.InferenceServerClient(url)
    rng = np.random.default_rng(batch * 1000 + concurrency)
    tensors = [rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8) for _ in range(4)]
    outputs = [grpcclient.InferRequestedOutput("probabilities")]
    done = 0
    counting = False

    async def worker(index: int) -> None:
        nonlocal done
        request = grpcclient.InferInput("image", [batch, size, size, 3], "UINT8")
        request.set_data_from_numpy(tensors[index % len(tensors)])
        while not stop.is_set():
            await client.infer(MODEL, [request], outputs=outputs, client_timeout=60)
            if counting:
                done += batch

    stop = asyncio.Event()
    try:
        tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        await asyncio.sleep(min(2.0, seconds / 3))  # warm-up: allocations, first batches
        counting = True
        await asyncio.sleep(seconds)
        counting = False
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await client.close()
    return done


def triton_ceiling(
    url: str,
    metrics_url: str,
    triton_pid: int | None,
    *,
    size: int,
    points: Sequence[tuple[int, int]],
    seconds: float,
    progress: Any = print,
) -> list[TritonPoint]:
    """Images/s of Triton alone at each (batch, concurrency) point."""
    results = []
    for batch, concurrency in points:
        before_counts = inference_counts(metrics_url)
        cpu_before = procstat.tree_cpu_seconds(triton_pid) if triton_pid else None
        started = time.perf_counter()
        done = asyncio.run(_drive(url, size, batch, concurrency, seconds))
        elapsed = time.perf_counter() - started
        cpu_after = procstat.tree_cpu_seconds(triton_pid) if triton_pid else None
        counts = inference_counts(metrics_url) - before_counts
        rate = done / seconds
        cpu_ms = None
        if cpu_before is not None and cpu_after is not None and counts.images:
            cpu_ms = (cpu_after - cpu_before) / counts.images * 1000
        point = TritonPoint(
            batch, concurrency, rate, int(counts.requests), cpu_ms, counts.batch_size
        )
        results.append(point)
        progress(
            f"  triton alone: batch {batch:>2} x {concurrency:>2} in flight: "
            f"{rate:7.1f} images/s ({counts.images:.0f} images in {elapsed:.1f} s, "
            f"Triton batch {counts.batch_size:.1f})"
        )
    return results


def _decode_worker(paths: Sequence[str], size: int, seconds: float) -> tuple[int, float, float]:
    datas = [Path(p).read_bytes() for p in paths]
    for data in datas:
        decode_image(data, size=size, max_pixels=MAX_PIXELS)
    count = 0
    cpu_started = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        decode_image(datas[count % len(datas)], size=size, max_pixels=MAX_PIXELS)
        count += 1
    return count, time.perf_counter() - started, time.process_time() - cpu_started


@dataclass(frozen=True)
class DecodeCeiling:
    processes: int
    images_per_s: float
    cpu_ms_per_image: float


def decode_ceiling(paths: Sequence[Path], *, size: int, seconds: float) -> DecodeCeiling:
    """Images/s of decode_image with one process per core (each cycles through `paths`)."""
    processes = os.cpu_count() or 1
    # Spawned, not forked: the harness has threads running, and a child forked from a
    # threaded process can inherit a held lock.
    context = multiprocessing.get_context("spawn")
    names = [str(p) for p in paths]
    with ProcessPoolExecutor(processes, mp_context=context) as pool:
        # Each worker starts at its own offset, so they do not all decode the same photo.
        futures = [
            pool.submit(_decode_worker, names[i:] + names[:i], size, seconds)
            for i in range(processes)
        ]
        results = [f.result() for f in futures]
    rate = sum(count / elapsed for count, elapsed, _ in results)
    cpu = sum(cpu for _, _, cpu in results) / max(1, sum(count for count, _, _ in results))
    return DecodeCeiling(processes, rate, cpu * 1000)


def decode_cpu_per_image(datas: Sequence[bytes], *, size: int, repeat: int) -> float:
    """Single-threaded CPU seconds per decode_image call over `datas` (after a warm-up)."""
    for data in datas:
        decode_image(data, size=size, max_pixels=MAX_PIXELS)
    started = time.thread_time()
    for index in range(repeat):
        decode_image(datas[index % len(datas)], size=size, max_pixels=MAX_PIXELS)
    return (time.thread_time() - started) / repeat


def combined_bound(triton_per_s: float, decode_per_s: float) -> float:
    """1 / (1/T + 1/D): both kinds of work on the same cores."""
    if triton_per_s <= 0 or decode_per_s <= 0:
        return 0.0
    return 1.0 / (1.0 / triton_per_s + 1.0 / decode_per_s)


def as_dict(value: TritonPoint | DecodeCeiling) -> dict[str, Any]:
    return asdict(value)
