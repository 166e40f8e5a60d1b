"""The benchmark's verdicts and its outputs: targets, JSON, Markdown and the summary.

`evaluate(results)` checks the targets of the benchmark (never loosened here: a missed
target is reported as FAIL with its ratio) and returns one `Verdict` per target;
`markdown(...)` renders the tables; `summary(...)` is what is printed at the end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.runs import DECODE_THREADS, RunResult

SERVICE_VS_BOUND = 0.85
SERVICE_VS_NAIVE = 5.0
OVERHEAD_EVENTS_PER_S = 1500.0
OVERHEAD_CPU_US = 300.0
LATENCY_MARGIN_MS = 60.0
RSS_LIMIT_MB = 400.0
# "Flat": the RSS trend over the soak, after its first fifth, projected over the whole soak,
# grows by no more than this many MB or this share of the mean RSS, whichever is larger.
FLAT_MB = 16.0
FLAT_SHARE = 0.05


@dataclass(frozen=True)
class Verdict:
    target: str
    status: str  # PASS, FAIL or NOT RUN
    detail: str
    ratio: float | None = None

    def line(self) -> str:
        ratio = f" (ratio {self.ratio:.2f})" if self.ratio is not None else ""
        return f"{self.status:<7} {self.target}: {self.detail}{ratio}"


def _verdict(target: str, ok: bool, detail: str, ratio: float | None) -> Verdict:
    return Verdict(target, "PASS" if ok else "FAIL", detail, ratio)


def _not_run(target: str, why: str) -> Verdict:
    return Verdict(target, "NOT RUN", why)


def rss_trend_mb(series: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """(projected growth over the soak in MB, mean RSS MB) after the first fifth; None if short."""
    if len(series) < 5:
        return None
    duration = series[-1][0] - series[0][0]
    kept = [(t, m) for t, m in series if t >= series[0][0] + duration / 5]
    if len(kept) < 3:
        return None
    n = len(kept)
    mean_t = sum(t for t, _ in kept) / n
    mean_m = sum(m for _, m in kept) / n
    var = sum((t - mean_t) ** 2 for t, _ in kept)
    slope = sum((t - mean_t) * (m - mean_m) for t, m in kept) / var if var else 0.0
    return slope * duration, mean_m


def evaluate(
    runs: Mapping[str, RunResult],
    *,
    bound: float | None,
    decode_tiny_ms: float | None,
) -> list[Verdict]:
    verdicts: list[Verdict] = []
    service = runs.get("service")
    naive = runs.get("naive")
    half = runs.get("service-50")
    overhead = runs.get("overhead")
    soak = runs.get("soak")

    target = f"service throughput >= {SERVICE_VS_BOUND} x combined CPU bound"
    if service is None or bound is None:
        verdicts.append(_not_run(target, "the service or ceiling phase was not run"))
    else:
        ratio = service.events_per_s / bound if bound else 0.0
        detail = f"{service.events_per_s:.1f} events/s vs bound {bound:.1f}/s"
        verdicts.append(_verdict(target, ratio >= SERVICE_VS_BOUND, detail, ratio))

    target = f"service throughput >= {SERVICE_VS_NAIVE:g} x naive"
    if service is None or naive is None:
        verdicts.append(_not_run(target, "the service or naive phase was not run"))
    else:
        ratio = service.events_per_s / naive.events_per_s if naive.events_per_s else 0.0
        detail = f"{service.events_per_s:.1f} vs naive {naive.events_per_s:.1f} events/s"
        verdicts.append(_verdict(target, ratio >= SERVICE_VS_NAIVE, detail, ratio))

    target = f"overhead run >= {OVERHEAD_EVENTS_PER_S:g} events/s per consumer process"
    if overhead is None:
        verdicts.append(_not_run(target, "the overhead phase was not run"))
    else:
        ratio = overhead.events_per_s / OVERHEAD_EVENTS_PER_S
        detail = f"{overhead.events_per_s:.0f} events/s"
        verdicts.append(_verdict(target, ratio >= 1.0, detail, ratio))

    target = f"consumer CPU per event excluding decode <= {OVERHEAD_CPU_US:g} us"
    if overhead is None or decode_tiny_ms is None:
        verdicts.append(_not_run(target, "the overhead phase was not run"))
    else:
        consumer_ms = overhead.cpu_ms_per_event.get("consumer", 0.0)
        decode_threads_ms = overhead.cpu_ms_per_event.get(DECODE_THREADS, 0.0)
        if decode_threads_ms > 0:  # what the decode threads used, read from /proc
            decode_ms = decode_threads_ms
            what = f"in the decode threads; one tiny decode alone {decode_tiny_ms * 1000:.0f} us"
        else:  # threads not named (an older service): one decode alone per event
            decode_ms, what = decode_tiny_ms, "decode"
        us = (consumer_ms - decode_ms) * 1000
        detail = (
            f"{us:.0f} us ({consumer_ms * 1000:.0f} us consumer CPU - "
            f"{decode_ms * 1000:.0f} us {what})"
        )
        verdicts.append(_verdict(target, us <= OVERHEAD_CPU_US, detail, us / OVERHEAD_CPU_US))

    target = f"p99 end-to-end at 50% of max <= origin p99 + {LATENCY_MARGIN_MS:g} ms"
    if half is None or not half.latency_ms or not half.origin_latency_ms:
        verdicts.append(_not_run(target, "the 50% run was not run"))
    else:
        p99 = half.latency_ms["p99"]
        limit = half.origin_latency_ms["p99"] + LATENCY_MARGIN_MS
        origin_p99 = half.origin_latency_ms["p99"]
        detail = f"p99 {p99:.0f} ms vs limit {limit:.0f} ms (origin p99 {origin_p99:.0f} ms)"
        verdicts.append(_verdict(target, p99 <= limit, detail, p99 / limit if limit else None))

    target = f"consumer RSS <= {RSS_LIMIT_MB:g} MB at max throughput"
    if service is None:
        verdicts.append(_not_run(target, "the service phase was not run"))
    else:
        peak = service.consumer_peak_rss_mb
        detail = f"peak {peak:.0f} MB"
        verdicts.append(_verdict(target, peak <= RSS_LIMIT_MB, detail, peak / RSS_LIMIT_MB))

    target = "consumer RSS flat over the soak"
    trend = rss_trend_mb(soak.rss_mb_series) if soak is not None else None
    if soak is None:
        verdicts.append(_not_run(target, "run `make bench-soak` (10 minutes)"))
    elif trend is None:
        verdicts.append(_not_run(target, "the soak was too short to judge"))
    else:
        growth, mean = trend
        allowed = max(FLAT_MB, FLAT_SHARE * mean)
        minutes = soak.window_s / 60
        detail = (
            f"trend {growth:+.1f} MB over {minutes:.1f} min (allowed {allowed:.0f} MB), "
            f"peak {soak.consumer_peak_rss_mb:.0f} MB"
        )
        ok = growth <= allowed and soak.consumer_peak_rss_mb <= RSS_LIMIT_MB
        verdicts.append(_verdict(target, ok, detail, growth / allowed if allowed else None))
    return verdicts


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def runs_table(runs: Sequence[RunResult]) -> str:
    head = (
        "| run | consumer | load | events | events/s | p50 ms | p95 ms | p99 ms | max ms "
        "| consumer CPU ms/ev | Triton CPU ms/ev | origin CPU ms/ev | Kafka CPU ms/ev "
        "| consumer peak RSS MB | Triton batch |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in runs:
        lat = r.latency_ms
        cpu = r.cpu_ms_per_event
        load = r.load if r.rate_target is None else f"{r.load} {r.rate_target:.0f}/s"
        rows.append(
            f"| {r.name} | {r.consumer} | {load} | {r.answered}/{r.events} "
            f"| {r.events_per_s:.1f} | {_fmt(lat.get('p50'), 0)} | {_fmt(lat.get('p95'), 0)} "
            f"| {_fmt(lat.get('p99'), 0)} | {_fmt(lat.get('max'), 0)} "
            f"| {_fmt(cpu.get('consumer'), 2)} | {_fmt(cpu.get('triton'), 2)} "
            f"| {_fmt(cpu.get('origin'), 2)} | {_fmt(cpu.get('kafka'), 2)} "
            f"| {r.consumer_peak_rss_mb:.0f} | {r.triton_batch_size:.1f} |"
        )
    return head + "\n".join(rows) + "\n"


def comparisons(runs: Mapping[str, RunResult], ceiling: Mapping[str, Any] | None) -> list[str]:
    """The four side-by-side lines: naive, ceiling, service, overhead."""
    lines = []
    naive = runs.get("naive")
    if naive is not None:
        lines.append(
            f"naive     {naive.events_per_s:8.1f} events/s   one at a time; consumer CPU "
            f"{_fmt(naive.cpu_ms_per_event.get('consumer'), 2)} ms/event"
        )
    if ceiling is not None:
        lines.append(
            f"ceiling   {ceiling['bound']:8.1f} images/s   {ceiling['bound_formula']} with "
            f"Triton alone T={ceiling['triton_best']['images_per_s']:.1f}/s "
            f"(batch {ceiling['triton_best']['batch']} x {ceiling['triton_best']['concurrency']}"
            f" in flight), decode alone D={ceiling['decode']['images_per_s']:.1f}/s "
            f"({ceiling['decode']['processes']} processes)"
        )
    service = runs.get("service")
    if service is not None:
        half = runs.get("service-50")
        latency = ""
        if half is not None and half.latency_ms:
            lat = half.latency_ms
            latency = (
                f"; at {half.rate_target or 0:.0f}/s p50/p95/p99/max "
                f"{lat['p50']:.0f}/{lat['p95']:.0f}/{lat['p99']:.0f}/{lat['max']:.0f} ms"
            )
        lines.append(
            f"service   {service.events_per_s:8.1f} events/s   consumer CPU "
            f"{_fmt(service.cpu_ms_per_event.get('consumer'), 2)} ms/event, Triton CPU "
            f"{_fmt(service.cpu_ms_per_event.get('triton'), 2)} ms/event, Triton batch "
            f"{service.triton_batch_size:.1f}, peak RSS {service.consumer_peak_rss_mb:.0f} MB"
            f"{latency}"
        )
    overhead = runs.get("overhead")
    if overhead is not None:
        lines.append(
            f"overhead  {overhead.events_per_s:8.1f} events/s   identity model, tiny images; "
            f"consumer CPU {_fmt(overhead.cpu_ms_per_event.get('consumer'), 3)} ms/event"
        )
    return lines


_FORMAT_COLUMNS = (
    "run",
    "format",
    "events",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "max ms",
    "decode p50 / p99 ms",
)


def _table(columns: Sequence[str], rows: str) -> str:
    """A Markdown table: two text columns, the rest numbers (right-aligned); `rows` ready."""
    header = "| " + " | ".join(columns) + " |\n"
    align = "|---|---|" + "---:|" * (len(columns) - 2) + "\n"
    return header + align + rows + "\n"


def markdown(
    report: Mapping[str, Any], runs: Sequence[RunResult], verdicts: Sequence[Verdict]
) -> str:
    machine = report["machine"]
    parts = [
        f"# Benchmark {report['started_at']} ({report['mode']}, profile {report['profile']})\n",
        f"Command: `{report['command']}`  \n"
        f"Machine: {machine['cpu']} x {machine['cores']} cores, {machine['memory_gib']} GiB, "
        f"{machine['kernel']}; load average {machine['load_before']} before, "
        f"{machine['load_after']} after; commit {report['commit']}\n",
        "## Comparisons\n",
        "```\n" + "\n".join(report["comparisons"]) + "\n```\n",
        "## Targets\n",
        "```\n" + "\n".join(v.line() for v in verdicts) + "\n```\n",
        "## Runs\n",
        runs_table(runs),
    ]
    ceiling = report.get("ceiling")
    if ceiling:
        rows = "\n".join(
            f"| {p['batch']} | {p['concurrency']} | {p['images_per_s']:.1f} "
            f"| {_fmt(p['triton_cpu_ms_per_image'], 2)} | {p['triton_batch_size']:.1f} |"
            for p in ceiling["triton_points"]
        )
        parts += [
            "\n## Ceilings\n",
            "| request batch | in flight | images/s | Triton CPU ms/image | Triton batch |\n"
            "|---:|---:|---:|---:|---:|\n" + rows + "\n",
            f"\nDecode alone: {ceiling['decode']['images_per_s']:.1f} images/s with "
            f"{ceiling['decode']['processes']} processes "
            f"({ceiling['decode']['cpu_ms_per_image']:.2f} CPU ms/image). "
            f"Combined bound {ceiling['bound_formula']} = {ceiling['bound']:.1f}/s.\n",
        ]
        cold = ceiling.get("cold_start")
        if cold:
            ratio = cold["cpu_ratio"]
            parts.append(
                f"\nCold-start model ({cold['model']}, {cold['image_size']} px) at batch "
                f"{cold['point']['batch']} x {cold['point']['concurrency']}: "
                f"{cold['point']['images_per_s']:.1f} images/s, Triton CPU "
                f"{_fmt(cold['point']['triton_cpu_ms_per_image'], 2)} ms/image against "
                f"{_fmt(cold['reference_cpu_ms_per_image'], 2)} for the {cold['reference']}: "
                f"{'n/a' if ratio is None else f'{ratio:.2f}x'} (target at most "
                f"{cold['max_cpu_ratio']:g}x).\n"
            )
    staged = [r for r in runs if r.stages_ms]
    if staged:
        rows = "\n".join(
            f"| {r.name} | {stage} | {_fmt(p.get('p50'), 0)} | {_fmt(p.get('p95'), 0)} "
            f"| {_fmt(p.get('p99'), 0)} | {_fmt(p.get('max'), 0)} |"
            for r in staged
            for stage, p in r.stages_ms.items()
        )
        parts += [
            "\n## Where the latency went (paced runs, the suggestions' own stage timings)\n",
            "fetch, decode and inference (batch queue and Triton) as each suggestion reports "
            "them; rest = measured end-to-end latency minus those (Kafka delivery of the "
            "event, waits for a fetch or decode slot, publishing). Each column is a "
            "percentile of its own stage, so the rows do not add up.\n",
            _table(["run", "stage", "p50 ms", "p95 ms", "p99 ms", "max ms"], rows),
        ]
    by_format = [r for r in runs if r.by_format_ms]
    if by_format:
        rows = "\n".join(
            f"| {r.name} | {fmt} | {p['events']:.0f} ({p['share']:.0f} %) | {_fmt(p['p50'], 0)} "
            f"| {_fmt(p['p95'], 0)} | {_fmt(p['p99'], 0)} | {_fmt(p['max'], 0)} "
            f"| {_fmt(p['decode_p50'], 0)} / {_fmt(p['decode_p99'], 0)} |"
            for r in by_format
            for fmt, p in r.by_format_ms.items()
        )
        parts += [
            "\n## Latency by image format (paced runs)\n",
            "End-to-end latency of the suggested events by the format of their image, and "
            "their decode time (p50 / p99). A format that is a tenth of the events decides "
            "the overall p99 when its own p90 is above the others' p99.\n",
            _table(_FORMAT_COLUMNS, rows),
        ]
    pieces = report.get("overhead_parts_cpu_us")
    if pieces:
        fetch = ", ".join(
            f"{us:.0f} us with {c} in flight" for c, us in pieces["fetch_us_by_concurrency"].items()
        )
        parts.append(
            "\n## Consumer CPU per event, piece by piece (harness, one thread)\n\n"
            f"fetch (ImageFetcher, tiny image, no latency): {fetch}; event decode "
            f"{pieces['event_decode']:.0f} us; suggestion build+encode "
            f"{pieces['suggestion_encode']:.0f} us; tiny image decode "
            f"{pieces['decode_tiny_us']:.0f} us.\n"
        )
    workload = report.get("workload")
    if workload:
        parts.append(f"\nWorkload: {workload}\n")
    notes = [f"- {r.name}: {n}" for r in runs for n in r.notes]
    if notes:
        parts += ["\n## Notes\n", "\n".join(notes) + "\n"]
    return "\n".join(parts)
