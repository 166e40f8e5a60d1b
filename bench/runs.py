"""One measured run: a consumer (the service or the naive one) against fresh topics.

Two shapes of load:

- `backlog`: N events are produced before the consumer starts; it drains them as fast as
  it can. Throughput is the answers over the window from the first answer to the last
  (broker append times), so start-up is not counted; CPU per event is the CPU the
  processes used in that window over the answers in it.
- `paced`: the consumer is started and ready, then events are produced at a fixed rate
  for a duration. End-to-end latency of each event is the broker append time of its
  answer minus that of the event; events produced during the first `warmup_s` are left
  out of the percentiles (connection set-up, first batches). With exactly-once delivery
  an answer counts from when the (read_committed) reader received it instead: appended
  inside a transaction, it is visible only once that commits.

Both read everything from Kafka (answers counted by key on the output and DLQ topics) and
from /proc (CPU, RSS); nothing comes from the service's own metrics.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench.kafkaio import (
    Answer,
    AnswerReader,
    EventSource,
    PacedProducer,
    Produced,
    RunTopics,
    create_run_topics,
    delete_topics,
    produce_backlog,
)
from bench.origin import percentiles
from bench.pyspy import PySpy, render, summarise
from bench.stack import REPO_ROOT, BenchStack, ServiceProcess, TritonEndpoint
from bench.tritonstats import InferenceCounts, inference_counts
from category_suggester.events import EventCodec
from devstack.process import StackError

Progress = Callable[[str], None]


@dataclass
class RunResult:
    """What one run measured. Times in ms, CPU in ms per event, memory in MB."""

    name: str
    consumer: str
    load: str
    events: int
    answered: int
    dead_lettered: int
    duplicates: int
    window_s: float
    events_per_s: float
    latency_ms: dict[str, float] = field(default_factory=dict)
    # Paced runs: percentiles per stage from the suggestions' own timings (see stage_split).
    stages_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    # Paced runs: end-to-end and decode percentiles per image format (see format_split).
    by_format_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu_ms_per_event: dict[str, float] = field(default_factory=dict)
    consumer_peak_rss_mb: float = 0.0
    triton_batch_size: float = 0.0
    triton_request_size: float = 0.0
    origin_latency_ms: dict[str, float] = field(default_factory=dict)
    rate_target: float | None = None
    notes: list[str] = field(default_factory=list)
    rss_mb_series: list[tuple[float, float]] = field(default_factory=list)
    per_minute_events: list[int] = field(default_factory=list)
    log: str = ""
    profile: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunContext:
    """What every run needs: the stack, the Triton in use and the image URLs."""

    stack: BenchStack
    triton: TritonEndpoint
    urls: Sequence[str]
    service_overrides: Mapping[str, str]
    run_dir: Path
    progress: Progress = print
    py_spy: bool = False

    @property
    def exactly_once(self) -> bool:
        """Whether the service runs with exactly-once delivery (`--service-env`)."""
        return self.service_overrides.get("SUGGESTER_DELIVERY") == "exactly_once"

    def answered_ms(self, consumer_kind: str) -> Callable[[Answer], int]:
        """When an answer counts: its broker append time; for the exactly-once service, when
        the reader received it (a record appended in an open transaction is not visible to
        a read_committed reader until the transaction commits)."""
        if consumer_kind == "service" and self.exactly_once:
            return lambda answer: answer.received_ms
        return lambda answer: answer.append_ms


class _Consumer:
    """The process under test: the service or the naive consumer."""

    def __init__(self, ctx: RunContext, kind: str, topics: RunTopics, log_path: Path) -> None:
        self.kind = kind
        self.service: ServiceProcess | None = None
        self.naive: subprocess.Popen[bytes] | None = None
        self.spy: PySpy | None = None
        self.log_path = log_path
        if kind == "service":
            env = ctx.stack.service_env(
                triton_url=ctx.triton.grpc_url,
                input_topic=topics.input,
                output_topic=topics.output,
                dlq_topic=topics.dlq,
                group=topics.group,
                overrides=ctx.service_overrides,
            )
            self.service = ServiceProcess(env, log_path)
            if ctx.py_spy:
                self.spy = PySpy(self.service.pid, log_path.with_suffix(".pyspy.txt"))
        else:
            self._log = log_path.open("ab")
            self.naive = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.naive",
                    "--bootstrap",
                    ctx.stack.bootstrap,
                    "--input",
                    topics.input,
                    "--output",
                    topics.output,
                    "--group",
                    topics.group,
                    "--triton",
                    ctx.triton.grpc_url,
                ],
                cwd=REPO_ROOT,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        if self.service is not None:
            return self.service.pid
        assert self.naive is not None
        return self.naive.pid

    def wait_ready(self) -> None:
        if self.service is not None:
            self.service.wait_ready()

    def check_alive(self) -> None:
        code = self.service.exit_code() if self.service is not None else None
        if self.naive is not None:
            code = self.naive.poll()
        if code is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])
            raise StackError(f"the {self.kind} consumer exited with {code} mid-run:\n{tail}")

    def stop(self) -> int | None:
        if self.service is not None:
            code = self.service.stop()
            if self.spy is not None:
                self.spy.wait()
            return code
        assert self.naive is not None
        self.naive.terminate()
        try:
            code = self.naive.wait(30)
        except subprocess.TimeoutExpired:
            self.naive.kill()
            code = self.naive.wait(10)
        self._log.close()
        return code


# CPU series of the consumer's decode threads (the service names them decode_<n>).
DECODE_THREADS = "consumer_decode"


def _sampler(ctx: RunContext, consumer: _Consumer) -> procstat.Sampler:
    trees: dict[str, Callable[[], int | None]] = {"consumer": lambda: consumer.pid}
    if ctx.triton.pid is not None:
        pid = ctx.triton.pid
        trees["triton"] = lambda: pid
    if ctx.stack.origin is not None:
        origin_pid = ctx.stack.origin.pid
        trees["origin"] = lambda: origin_pid
    kafka_pid = ctx.stack.kafka_pid
    if kafka_pid is not None:
        trees["kafka"] = lambda: kafka_pid
    # The service's decode threads, apart (consumer CPU "excluding decode").
    threads = {DECODE_THREADS: (lambda: consumer.pid, "decode_")}
    return procstat.Sampler(trees, threads=threads).start()


def _cpu_per_event(
    sampler: procstat.Sampler, start: float, end: float, events: int
) -> dict[str, float]:
    if events <= 0:
        return {}
    return {
        name: round(series.cpu_between(start, end) / events * 1000, 3)
        for name, series in sampler.series.items()
        if series.times
    }


def _triton_counts(ctx: RunContext) -> InferenceCounts:
    return inference_counts(ctx.triton.metrics_url)


def run_backlog(
    ctx: RunContext,
    name: str,
    consumer_kind: str,
    *,
    events: int,
    max_seconds: float,
) -> RunResult:
    """Produce `events` first, then let the consumer drain them (see the module docstring)."""
    say = ctx.progress
    topics = create_run_topics(ctx.stack.bootstrap, name)
    source = EventSource(ctx.urls, name)
    say(f"[{name}] producing a backlog of {events} events")
    produce_backlog(ctx.stack.bootstrap, topics.input, (source.record() for _ in range(events)))
    if ctx.stack.origin is not None:
        ctx.stack.origin.reset()
    counts_before = _triton_counts(ctx)
    reader = AnswerReader(ctx.stack.bootstrap, topics).start()
    log_path = ctx.run_dir / f"{name}.log"
    consumer = _Consumer(ctx, consumer_kind, topics, log_path)
    sampler = _sampler(ctx, consumer)
    started = time.monotonic()
    try:
        say(f"[{name}] {consumer_kind} consumer started (pid {consumer.pid}); draining")

        def report(seen: int) -> None:
            consumer.check_alive()
            elapsed = time.monotonic() - started
            say(f"[{name}] {seen}/{events} answered after {elapsed:.0f} s")

        # The first answer opens the window; from then the run lasts at most max_seconds.
        reader.wait_for(1, 180, progress=report)
        if reader.answered == 0:
            consumer.check_alive()
            raise StackError(f"[{name}] no answer within 180 s; see {log_path}")
        first_seen = time.monotonic()
        reader.wait_for(events, max_seconds - (time.monotonic() - first_seen), progress=report)
    finally:
        code = consumer.stop()
        sampler.stop()
        reader.stop()
    counts = _triton_counts(ctx) - counts_before
    answers = sorted(map(ctx.answered_ms(consumer_kind), reader.first.values()))
    result = _result(
        name, consumer_kind, "backlog", events, reader, answers, sampler, counts, log_path
    )
    if code not in (0, None, -15):
        result.notes.append(f"the consumer exited with {code}")
    _attach_profile(ctx, consumer, result)
    if ctx.stack.origin is not None:
        result.origin_latency_ms = ctx.stack.origin.stats()
    delete_topics(ctx.stack.bootstrap, topics)
    return result


def _result(
    name: str,
    consumer_kind: str,
    load: str,
    events: int,
    reader: AnswerReader,
    answers_ms: list[int],
    sampler: procstat.Sampler,
    counts: InferenceCounts,
    log_path: Path,
    *,
    window: tuple[float, float] | None = None,
) -> RunResult:
    if window is None and len(answers_ms) >= 2:
        window = (answers_ms[0] / 1000, answers_ms[-1] / 1000)
    answered = len(answers_ms)
    window_s = (window[1] - window[0]) if window else 0.0
    # The window from the first answer to the last holds answered - 1 intervals.
    in_window = answered - 1 if load == "backlog" else answered
    rate = in_window / window_s if window_s > 0 else 0.0
    cpu = _cpu_per_event(sampler, window[0], window[1], in_window) if window else {}
    consumer_series = sampler.series["consumer"]
    return RunResult(
        name=name,
        consumer=consumer_kind,
        load=load,
        events=events,
        answered=answered,
        dead_lettered=reader.dead_letters,
        duplicates=reader.duplicates,
        window_s=round(window_s, 3),
        events_per_s=round(rate, 2),
        cpu_ms_per_event=cpu,
        consumer_peak_rss_mb=round(consumer_series.peak_rss / 2**20, 1),
        triton_batch_size=round(counts.batch_size, 2),
        triton_request_size=round(counts.request_size, 2),
        log=str(log_path),
    )


def run_paced(
    ctx: RunContext,
    name: str,
    consumer_kind: str,
    *,
    rate: float,
    seconds: float,
    warmup_s: float,
    drain_s: float = 60,
    rss_every_s: float = 0.0,
) -> RunResult:
    """The consumer ready first, then events at `rate` for `seconds` (module docstring)."""
    say = ctx.progress
    topics = create_run_topics(ctx.stack.bootstrap, name)
    source = EventSource(ctx.urls, name)
    reader = AnswerReader(ctx.stack.bootstrap, topics).start()
    log_path = ctx.run_dir / f"{name}.log"
    consumer = _Consumer(ctx, consumer_kind, topics, log_path)
    sampler = _sampler(ctx, consumer)
    producer: PacedProducer | None = None
    load_started = time.time()
    try:
        consumer.wait_ready()
        if ctx.stack.origin is not None:
            ctx.stack.origin.reset()
        counts_before = _triton_counts(ctx)
        total = int(rate * seconds)
        say(f"[{name}] producing {total} events at {rate:.1f}/s for {seconds:.0f} s")
        producer = PacedProducer(
            ctx.stack.bootstrap, topics.input, source, rate=rate, duration_s=seconds
        ).start()
        started = time.monotonic()
        load_started = time.time()

        def report(seen: int) -> None:
            consumer.check_alive()
            elapsed = time.monotonic() - started
            rss = procstat.memory(consumer.pid)[0] / 2**20
            say(
                f"[{name}] {producer.sent if producer else 0} sent, {seen} answered after "
                f"{elapsed:.0f} s; consumer RSS {rss:.0f} MB"
            )

        every = 30.0 if seconds > 120 else 5.0
        reader.wait_for(total, seconds + drain_s, progress=report, progress_every_s=every)
        producer.stop()
        producer.join(30)
    finally:
        if producer is not None:
            producer.stop()
        code = consumer.stop()
        sampler.stop()
        reader.stop()
    counts = _triton_counts(ctx) - counts_before
    produced = producer.produced
    result = _paced_result(
        name,
        consumer_kind,
        total,
        reader,
        produced,
        sampler,
        counts,
        log_path,
        warmup_s,
        answered_ms=ctx.answered_ms(consumer_kind),
        image_format=lambda key: image_format(source.url_for(key)),
    )
    result.rate_target = rate
    if not produced.log_append_time:
        result.notes.append("the broker returned CreateTime, not LogAppendTime, for events")
    if code not in (0, None, -15):
        result.notes.append(f"the consumer exited with {code}")
    _attach_profile(ctx, consumer, result)
    if ctx.stack.origin is not None:
        result.origin_latency_ms = ctx.stack.origin.stats()
    if rss_every_s > 0:
        result.rss_mb_series = _rss_series(sampler.series["consumer"], load_started, rss_every_s)
    delete_topics(ctx.stack.bootstrap, topics)
    return result


_STAGES = ("fetch", "decode", "inference", "rest")


def stage_split(answers: Mapping[bytes, tuple[float, bytes]]) -> dict[str, dict[str, float]]:
    """Where the latency of suggested events went: percentiles per stage.

    `answers` maps each key to (end-to-end latency ms as measured, suggestion value). The
    stages are the service's own timings carried in each suggestion: fetch (retries
    included), decode, inference (batch queue and Triton); `rest` is the measured latency
    minus those three: Kafka delivery of the event, waits for a fetch or decode slot, and
    publishing. A diagnosis, not a measurement the targets use.
    """
    codec = EventCodec()
    split: dict[str, list[float]] = {stage: [] for stage in _STAGES}
    for latency, value in answers.values():
        timings = codec.decode_suggestion(value).timings
        parts = (timings.fetch_ms, timings.preprocess_ms, timings.inference_ms)
        for stage, ms in zip(_STAGES, parts, strict=False):
            split[stage].append(ms)
        split["rest"].append(latency - sum(parts))
    return {stage: percentiles(values) for stage, values in split.items()}


_FORMATS_BY_SUFFIX = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def image_format(url: str) -> str:
    """The format of a workload image, from its name on the origin (`photos/0003.png`)."""
    suffix = url.rsplit(".", 1)[-1].lower() if "." in url.rsplit("/", 1)[-1] else ""
    return _FORMATS_BY_SUFFIX.get(suffix, suffix.upper() or "unknown")


def format_split(
    answers: Mapping[bytes, tuple[float, bytes]], image_format: Callable[[bytes], str]
) -> dict[str, dict[str, float]]:
    """End-to-end latency and decode time per image format of the suggested events.

    `answers` as for `stage_split`; `image_format` names the format of an event's image
    from its key. Per format: `events`, `share` (% of the events), end-to-end `p50`, `p95`,
    `p99` and `max`, and `decode_p50`/`decode_p99` (the suggestions' own decode timing).
    Shows which images make the tail: a format that is a tenth of the events decides the
    overall p99 when its own p90 is above everyone else's p99.
    """
    codec = EventCodec()
    latency: dict[str, list[float]] = {}
    decode: dict[str, list[float]] = {}
    for key, (ms, value) in answers.items():
        fmt = image_format(key)
        latency.setdefault(fmt, []).append(ms)
        decode.setdefault(fmt, []).append(codec.decode_suggestion(value).timings.preprocess_ms)
    total = sum(len(values) for values in latency.values())
    split: dict[str, dict[str, float]] = {}
    for fmt in sorted(latency, key=lambda f: -len(latency[f])):
        e2e, dec = percentiles(latency[fmt]), percentiles(decode[fmt])
        split[fmt] = {
            "events": e2e["count"],
            "share": 100 * e2e["count"] / total,
            **{q: e2e[q] for q in ("p50", "p95", "p99", "max")},
            "decode_p50": dec["p50"],
            "decode_p99": dec["p99"],
        }
    return split


def _paced_result(
    name: str,
    consumer_kind: str,
    total: int,
    reader: AnswerReader,
    produced: Produced,
    sampler: procstat.Sampler,
    counts: InferenceCounts,
    log_path: Path,
    warmup_s: float,
    *,
    answered_ms: Callable[[Answer], int],
    image_format: Callable[[bytes], str] | None = None,
) -> RunResult:
    answers = reader.first
    sent = produced.append_ms
    answer_ms = sorted(map(answered_ms, answers.values()))
    if not sent or not answer_ms:
        return _result(
            name, consumer_kind, "paced", total, reader, answer_ms, sampler, counts, log_path
        )
    first_sent = min(sent.values())
    window = (first_sent / 1000, answer_ms[-1] / 1000)
    result = _result(
        name,
        consumer_kind,
        "paced",
        total,
        reader,
        answer_ms,
        sampler,
        counts,
        log_path,
        window=window,
    )
    cutoff = first_sent + warmup_s * 1000
    latencies = [
        float(answered_ms(answer) - sent[key])
        for key, answer in answers.items()
        if key in sent and sent[key] >= cutoff
    ]
    result.latency_ms = percentiles(latencies)
    if consumer_kind == "service":
        suggested = {
            key: (float(answered_ms(answer) - sent[key]), reader.suggestions[key])
            for key, answer in answers.items()
            if key in sent and sent[key] >= cutoff and key in reader.suggestions
        }
        result.stages_ms = stage_split(suggested)
        if image_format is not None:
            result.by_format_ms = format_split(suggested, image_format)
    minute_counts: dict[int, int] = {}
    for stamp in answer_ms:
        minute = int((stamp - first_sent) // 60_000)
        minute_counts[minute] = minute_counts.get(minute, 0) + 1
    result.per_minute_events = [minute_counts.get(m, 0) for m in range(max(minute_counts) + 1)]
    return result


def _rss_series(series: procstat.Series, start: float, every_s: float) -> list[tuple[float, float]]:
    """(seconds since `start`, RSS MB), one point per `every_s` from the start of the load."""
    points: list[tuple[float, float]] = []
    next_at = start
    for when, rss in zip(series.times, series.rss, strict=True):
        if when >= next_at and rss > 0:
            points.append((round(when - start, 1), round(rss / 2**20, 1)))
            next_at += every_s
    return points


def _attach_profile(ctx: RunContext, consumer: _Consumer, result: RunResult) -> None:
    if consumer.spy is None:
        return
    result.profile = summarise(consumer.spy.path)
    ctx.progress(f"[{result.name}] py-spy profile of the consumer ({consumer.spy.path}):")
    for line in render(result.profile).splitlines():
        ctx.progress(line)
