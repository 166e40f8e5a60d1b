"""Run the fuzzers: `python -m fuzz [--seconds N] [TARGET...]` (targets: events, images).

Each target runs in its own process for `--seconds`, seeded afresh from the hostile-input
corpus (build/fuzz/<target>/seeds) and with the inputs it found interesting in earlier
runs (build/fuzz/<target>/corpus, kept). An input that crashes, hangs past `--timeout`
seconds or takes more than `--rss-limit-mb` is written to build/fuzz/<target>/crashes/;
replay one with `python -m fuzz.<target> FILE`. Exits 1 if any target found one.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

from fuzz.seeds import SEEDS

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK = REPO_ROOT / "build" / "fuzz"
# target: largest input libFuzzer makes (bytes)
TARGETS = {"events": 8 * 1024, "images": 64 * 1024}


def write_seeds(target: str, folder: Path) -> int:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    seeds = SEEDS[target]()
    for data in seeds:
        (folder / hashlib.sha256(data).hexdigest()).write_bytes(data)
    return len(seeds)


def run(target: str, *, seconds: int, timeout_s: int, rss_limit_mb: int) -> bool:
    """Fuzz one target; True when nothing was found."""
    base = WORK / target
    corpus, seeds, crashes = base / "corpus", base / "seeds", base / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crashes.mkdir(parents=True, exist_ok=True)
    count = write_seeds(target, seeds)
    before = set(crashes.iterdir())
    print(f"fuzz {target}: {seconds} s from {count} seeds", flush=True)
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            f"fuzz.{target}",
            f"-max_total_time={seconds}",
            f"-timeout={timeout_s}",
            f"-rss_limit_mb={rss_limit_mb}",
            f"-max_len={TARGETS[target]}",
            f"-artifact_prefix={crashes}/",
            "-print_final_stats=1",
            str(corpus),
            str(seeds),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    found = sorted(set(crashes.iterdir()) - before)
    stats = [line for line in result.stderr.splitlines() if line.startswith("stat::")]
    runs = next(
        (line.split(":")[-1].strip() for line in stats if "number_of_executed_units" in line), "?"
    )
    took = time.monotonic() - started
    if result.returncode == 0 and not found:
        print(f"fuzz {target}: ok, {runs} inputs in {took:.0f} s", flush=True)
        return True
    print(result.stderr[-6000:], file=sys.stderr)
    print(
        f"fuzz {target}: FAILED (exit {result.returncode}); inputs: "
        + (", ".join(str(path) for path in found) or "none saved"),
        file=sys.stderr,
        flush=True,
    )
    return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"any of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=300, help="per target")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    parser.add_argument("--rss-limit-mb", type=int, default=3072)
    args = parser.parse_args(argv)
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    ok = [
        run(t, seconds=args.seconds, timeout_s=args.timeout, rss_limit_mb=args.rss_limit_mb)
        for t in args.targets or list(TARGETS)
    ]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
