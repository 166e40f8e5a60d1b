"""What the kernel says about a process: CPU seconds and memory, from /proc.

`cpu_seconds(pid)` is utime + stime of every thread of the process (field 14 and 15 of
/proc/<pid>/stat) plus what its reaped children used (fields 16 and 17), in seconds.
`tree_cpu_seconds(pid)` adds every live descendant (Triton's Python backend stubs are child
processes of tritonserver). `memory(pid)` reads VmRSS and VmHWM (the peak RSS) in bytes.

`threads_cpu_seconds(pid, prefix)` is the CPU of the threads whose kernel name starts
with `prefix` (the service names its decode threads `decode_<n>`: category_suggester/threads.py).
`Sampler` polls a set of named process trees on a thread every `interval_s` and keeps the
time series (wall-clock time, CPU seconds, RSS), so a run can ask for the CPU spent between
any two moments (linearly interpolated between samples) and the RSS over time.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(stat: Path) -> list[str] | None:
    """Fields 3.. of a /proc stat file (a process's or a thread's); None when it is gone."""
    try:
        text = stat.read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields restart after ")".
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process and its reaped children; 0 when gone."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    if fields is None:
        return 0.0
    # After the command name the list starts at field 3: utime is field 14 -> index 11.
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / _TICKS


def threads_cpu_seconds(pid: int, prefix: str) -> float:
    """User + system CPU seconds of the live threads of `pid` named `prefix`...; 0 if none."""
    ticks = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            if not (task / "comm").read_text().startswith(prefix):
                continue
        except OSError:  # the thread ended meanwhile
            continue
        fields = _stat_fields(task / "stat")
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICKS


def children(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc/<pid>/task/*/children)."""
    found: list[int] = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found.extend(int(v) for v in path.read_text().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    out = [pid]
    index = 0
    while index < len(out):
        out.extend(children(out[index]))
        index += 1
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of the process and all its live descendants."""
    return sum(cpu_seconds(p) for p in descendants(pid))


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of the process in bytes; (0, 0) when it is gone."""
    rss = hwm = 0
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return rss, hwm


@dataclass
class Series:
    """Samples of one process tree: wall time, CPU seconds, RSS and peak RSS (bytes)."""

    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    hwm: list[int] = field(default_factory=list)

    def cpu_at(self, when: float) -> float:
        """CPU seconds at wall time `when`, interpolated between the nearest samples."""
        if not self.times:
            return 0.0
        i = bisect.bisect_left(self.times, when)
        if i <= 0:
            return self.cpu[0]
        if i >= len(self.times):
            return self.cpu[-1]
        t0, t1 = self.times[i - 1], self.times[i]
        c0, c1 = self.cpu[i - 1], self.cpu[i]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)

    def cpu_between(self, start: float, end: float) -> float:
        return max(0.0, self.cpu_at(end) - self.cpu_at(start))

    @property
    def peak_rss(self) -> int:
        return max(self.hwm, default=0)


class Sampler:
    """Samples named process trees every `interval_s` on a thread; `stop()` ends it.

    `trees` maps a name to a function that returns the root pid now (or None while there
    is none), so a process started later, or restarted, is followed. `threads` maps a name
    to (such a function, a thread name prefix): the CPU of those threads of that process
    (no RSS), a series like the others.
    """

    def __init__(
        self,
        trees: Mapping[str, Callable[[], int | None]],
        interval_s: float = 0.25,
        threads: Mapping[str, tuple[Callable[[], int | None], str]] | None = None,
    ) -> None:
        self._trees = dict(trees)
        self._threads = dict(threads or {})
        self._interval_s = interval_s
        self.series: dict[str, Series] = {name: Series() for name in [*self._trees, *self._threads]}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def start(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        now = time.time()
        for name, root in self._trees.items():
            pid = root()
            if pid is None:
                continue
            pids = descendants(pid)
            series = self.series[name]
            rss, hwm = memory(pid)
            series.times.append(now)
            series.cpu.append(sum(cpu_seconds(p) for p in pids))
            series.rss.append(rss)
            series.hwm.append(hwm)
        for name, (root, prefix) in self._threads.items():
            pid = root()
            if pid is None:
                continue
            series = self.series[name]
            series.times.append(now)
            series.cpu.append(threads_cpu_seconds(pid, prefix))
            series.rss.append(0)
            series.hwm.append(0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
