"""The benchmark's arithmetic: verdicts, percentiles, /proc readings, Triton counters."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from bench import procstat
from bench.ceiling import combined_bound
from bench.origin import percentiles
from bench.pyspy import summarise
from bench.report import evaluate, markdown, rss_trend_mb
from bench.runs import DECODE_THREADS, RunResult, format_split, image_format, stage_split
from bench.tritonstats import parse
from category_suggester.events import EventCodec, StageTimings
from category_suggester.threads import NamedThread
from tests.support.kafka import make_suggestion


def run(name: str, events_per_s: float, **fields: object) -> RunResult:
    result = RunResult(
        name=name,
        consumer="service",
        load="backlog",
        events=100,
        answered=100,
        dead_lettered=0,
        duplicates=0,
        window_s=10.0,
        events_per_s=events_per_s,
    )
    for key, value in fields.items():
        setattr(result, key, value)
    return result


def test_combined_bound_is_the_harmonic_combination() -> None:
    assert combined_bound(100.0, 100.0) == pytest.approx(50.0)
    assert combined_bound(120.0, 400.0) == pytest.approx(1 / (1 / 120 + 1 / 400))
    assert combined_bound(0.0, 100.0) == 0.0


def test_every_target_passes_or_fails_on_its_own_numbers() -> None:
    runs = {
        "naive": run("naive", 10.0),
        "service": run("service", 80.0, consumer_peak_rss_mb=300.0),
        "service-50": run(
            "service-50",
            40.0,
            latency_ms={"p50": 60.0, "p95": 90.0, "p99": 110.0, "max": 130.0},
            origin_latency_ms={"p99": 60.0},
        ),
        "overhead": run("overhead", 1600.0, cpu_ms_per_event={"consumer": 0.45}),
    }
    verdicts = evaluate(runs, bound=90.0, decode_tiny_ms=0.2)
    statuses = [v.status for v in verdicts]
    assert statuses == ["PASS", "PASS", "PASS", "PASS", "PASS", "PASS", "NOT RUN"]

    runs["service"] = run("service", 70.0, consumer_peak_rss_mb=450.0)
    runs["overhead"] = run("overhead", 900.0, cpu_ms_per_event={"consumer": 0.6})
    runs["service-50"].latency_ms["p99"] = 200.0
    verdicts = evaluate(runs, bound=90.0, decode_tiny_ms=0.2)
    assert [v.status for v in verdicts] == [
        "FAIL",
        "PASS",
        "FAIL",
        "FAIL",
        "FAIL",
        "FAIL",
        "NOT RUN",
    ]
    assert verdicts[0].ratio == pytest.approx(70 / 90)
    assert verdicts[3].ratio == pytest.approx(400 / 300)


def test_cpu_excluding_decode_subtracts_the_decode_threads_when_measured() -> None:
    overhead = run("overhead", 1000.0, cpu_ms_per_event={"consumer": 0.9, DECODE_THREADS: 0.3})
    verdicts = evaluate({"overhead": overhead}, bound=None, decode_tiny_ms=0.2)
    cpu = next(v for v in verdicts if "excluding decode" in v.target)
    assert cpu.ratio == pytest.approx(600 / 300)
    assert "300 us in the decode threads" in cpu.detail
    assert "one tiny decode alone 200 us" in cpu.detail


def test_missing_phases_are_not_run_never_pass() -> None:
    verdicts = evaluate({}, bound=None, decode_tiny_ms=None)
    assert {v.status for v in verdicts} == {"NOT RUN"}


def test_rss_trend_flags_growth_and_ignores_the_warm_up() -> None:
    flat = [(t * 10.0, 200.0 + (50.0 if t < 5 else 0.0)) for t in range(60)]
    growth, mean = rss_trend_mb(flat) or (None, None)
    assert growth == pytest.approx(0.0, abs=1e-6)
    assert mean == pytest.approx(200.0)
    leaking = [(t * 10.0, 200.0 + t) for t in range(60)]
    growth, _ = rss_trend_mb(leaking) or (0.0, 0.0)
    assert growth == pytest.approx(59.0, rel=0.01)  # 1 MB per 10 s over 590 s
    assert rss_trend_mb(leaking[:3]) is None


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    stats = percentiles(values)
    assert (stats["p50"], stats["p95"], stats["p99"], stats["max"]) == (50, 95, 99, 100)
    assert percentiles([])["count"] == 0


def test_triton_counters_are_summed_over_versions_of_the_model() -> None:
    text = "\n".join(
        [
            "# HELP nv_inference_count Number of inferences performed",
            'nv_inference_count{model="category_classifier",version="1"} 64',
            'nv_inference_count{model="category_classifier",version="2"} 32',
            'nv_inference_count{model="other",version="1"} 999',
            'nv_inference_exec_count{model="category_classifier",version="1"} 4',
            'nv_inference_exec_count{model="category_classifier",version="2"} 2',
            'nv_inference_request_success{model="category_classifier",version="1"} 12',
        ]
    )
    counts = parse(text, "category_classifier")
    assert (counts.images, counts.executions, counts.requests) == (96, 6, 12)
    assert counts.batch_size == 16
    assert counts.request_size == 8


def test_proc_readings_of_this_process() -> None:
    started = procstat.cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:
        pass
    assert procstat.cpu_seconds(os.getpid()) > started
    rss, hwm = procstat.memory(os.getpid())
    assert 0 < rss <= hwm
    assert procstat.descendants(os.getpid())[0] == os.getpid()
    assert procstat.memory(2**22 + 12345) == (0, 0)


def test_cpu_of_named_threads_is_read_apart() -> None:
    burnt = threading.Event()
    stop = threading.Event()

    def burn() -> None:  # 100 ms of its own CPU, then idle until told to end
        while time.thread_time() < 0.1:
            pass
        burnt.set()
        stop.wait(30)

    sampler = procstat.Sampler({}, threads={"d": (os.getpid, "decode_test")})
    thread = NamedThread(target=burn, name="decode_test")
    thread.start()
    try:
        assert burnt.wait(30)
        sampler.sample()
        measured = procstat.threads_cpu_seconds(os.getpid(), "decode_test")
    finally:
        stop.set()
        thread.join()
    assert 0.08 <= measured < 1.0  # clock ticks are 10 ms
    assert sampler.series["d"].cpu[-1] >= 0.08
    assert procstat.threads_cpu_seconds(os.getpid(), "no-such-thread") == 0


def test_series_interpolates_cpu_between_samples() -> None:
    series = procstat.Series(times=[0.0, 10.0], cpu=[1.0, 3.0], rss=[1, 1], hwm=[5, 7])
    assert series.cpu_between(2.5, 7.5) == pytest.approx(1.0)
    assert series.cpu_at(-1.0) == 1.0
    assert series.cpu_at(20.0) == 3.0
    assert series.peak_rss == 7


def test_py_spy_summary_shares(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "thread (1): MainThread;main (app.py:1);fetch (category_suggester/fetch.py:10) 30\n"
        "thread (1): MainThread;main (app.py:1);decode (category_suggester/preprocess.py:5) 10\n"
    )
    summary = summarise(raw)
    assert summary["samples"] == 40
    assert summary["self"][0] == ("fetch (category_suggester/fetch.py)", 75.0)
    assert ("main (app.py)", 100.0) in summary["inclusive"]


def test_stage_split_takes_the_stages_from_the_suggestions_and_leaves_the_rest() -> None:
    codec = EventCodec()
    base = make_suggestion()
    answers = {}
    for i in range(1, 101):
        timings = StageTimings(fetch_ms=40 + i, preprocess_ms=5, inference_ms=2 * i, total_ms=0)
        value = codec.encode_suggestion(base.model_copy(update={"timings": timings}))
        answers[f"k{i}".encode()] = (float(100 + 3 * i), value)

    split = stage_split(answers)

    assert split["fetch"]["p50"] == 90
    assert split["fetch"]["max"] == 140
    assert split["decode"]["p99"] == 5
    assert split["inference"]["p99"] == 198
    # rest = 100 + 3i - (45 + i + 2i) = 55 for every event
    assert split["rest"]["p50"] == split["rest"]["max"] == 55


def test_format_split_finds_the_format_that_makes_the_tail() -> None:
    codec = EventCodec()
    base = make_suggestion()
    urls = {
        b"run-%08d" % i: f"http://o/photos/{i:04d}.{'webp' if i % 10 == 7 else 'jpg'}"
        for i in range(200)
    }
    answers = {}
    for key, url in urls.items():
        slow = url.endswith(".webp")
        timings = StageTimings(
            fetch_ms=40, preprocess_ms=50 if slow else 3, inference_ms=20, total_ms=0
        )
        value = codec.encode_suggestion(base.model_copy(update={"timings": timings}))
        answers[key] = (150.0 if slow else 70.0, value)

    split = format_split(answers, lambda key: image_format(urls[key]))

    assert list(split) == ["JPEG", "WEBP"]  # the commoner first
    assert split["WEBP"]["events"] == 20
    assert split["WEBP"]["share"] == 10
    assert split["WEBP"]["p99"] == 150
    assert split["WEBP"]["decode_p99"] == 50
    assert split["JPEG"]["p99"] == 70
    assert split["JPEG"]["decode_p50"] == 3


def test_image_format_reads_the_workload_names() -> None:
    assert image_format("http://127.0.0.1:9/photos/0001.jpg") == "JPEG"
    assert image_format("http://127.0.0.1:9/photos/0003.png") == "PNG"
    assert image_format("http://127.0.0.1:9/photos/0007.webp") == "WEBP"
    assert image_format("http://127.0.0.1:9/photos/noext") == "unknown"


def test_report_lists_latency_by_format() -> None:
    paced = run(
        "service-50",
        35.0,
        load="paced",
        by_format_ms={
            "JPEG": {
                "events": 80,
                "share": 80.0,
                "p50": 90.0,
                "p95": 120.0,
                "p99": 130.0,
                "max": 140.0,
                "decode_p50": 3.0,
                "decode_p99": 6.0,
            },
            "WEBP": {
                "events": 10,
                "share": 10.0,
                "p50": 130.0,
                "p95": 190.0,
                "p99": 210.0,
                "max": 220.0,
                "decode_p50": 31.0,
                "decode_p99": 58.0,
            },
        },
    )
    report = {
        "started_at": "t",
        "mode": "quick",
        "profile": "cpu",
        "command": "python -m bench",
        "commit": "c",
        "comparisons": [],
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "memory_gib": 1,
            "kernel": "k",
            "load_before": "0",
            "load_after": "0",
        },
    }
    text = markdown(report, [paced], [])
    assert "| service-50 | WEBP | 10 (10 %) | 130 | 190 | 210 | 220 | 31 / 58 |" in text
