"""Optional sampling profile of the consumer during a run (`python -m bench --py-spy`).

`PySpy(pid, path)` runs `py-spy record` against the process in raw (collapsed stack)
format, one line per distinct stack with its sample count, until the process exits; it
samples only the thread holding the GIL (`--gil`), so the shares are of the Python time
the process spends (code that releases the GIL, such as Pillow decoding or librdkafka,
does not show; a thread waiting for the GIL is not counted as busy where it waits); the
file can be turned into a flame graph by any collapsed-stack tool. `summarise(path)` reads
it back: the share of samples per function where the time was spent (self) and per
function anywhere on the stack (inclusive), the top of each. py-spy is a separate
install (`pip install py-spy`); it needs ptrace permission on the process.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


class PySpyError(RuntimeError):
    """py-spy is not installed."""


class PySpy:
    def __init__(self, pid: int, path: Path, rate: int = 200) -> None:
        binary = shutil.which("py-spy") or _beside_python()
        if binary is None:
            raise PySpyError("--py-spy needs py-spy: pip install py-spy")
        self.path = path
        self._log = path.with_suffix(".log").open("ab")
        self._process = subprocess.Popen(
            [
                binary,
                "record",
                "--pid",
                str(pid),
                "--format",
                "raw",
                "--rate",
                str(rate),
                "--nonblocking",
                "--gil",
                "--threads",
                "--output",
                str(path),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait(self, timeout_s: float = 30) -> None:
        """Wait for py-spy to write its file (it stops when the process exits)."""
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            self._process.wait(10)
        self._log.close()


def _beside_python() -> str | None:
    import sys

    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.is_file() else None


def _function(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match.group("file")
    # Shorten site-packages paths to the package, keep the project's own relative paths.
    if "site-packages/" in file:
        file = file.split("site-packages/", 1)[1]
    elif "/lib/python3" in file:
        file = "stdlib/" + file.split("/lib/python3", 1)[1].split("/", 1)[-1]
    return f"{match.group('name')} ({file})"


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of samples per function, and per thread."""
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    if not path.is_file():
        return {"samples": 0}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # With --threads the first element names the thread.
        thread, frames = frames[0], frames[1:]
        total += count
        threads[re.sub(r"\s*\(?0x[0-9a-f]+\)?", "", thread).strip()] += count
        names = [_function(f) for f in frames]
        if names:
            self_counts[names[-1]] += count
        for name in set(names):
            inclusive[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "threads": shares(threads),
        "self": shares(self_counts),
        "inclusive": shares(inclusive),
    }


def render(summary: dict[str, Any]) -> str:
    if not summary.get("samples"):
        return "  (no samples)"
    lines = [f"  {summary['samples']} samples; by thread:"]
    lines += [f"    {share:5.1f}%  {name}" for name, share in summary["threads"]]
    lines.append("  self time:")
    lines += [f"    {share:5.1f}%  {name}" for name, share in summary["self"]]
    lines.append("  inclusive:")
    lines += [f"    {share:5.1f}%  {name}" for name, share in summary["inclusive"]]
    return "\n".join(lines)
