"""What every local server of the dev stack shares: jars from Maven, a detached process, ports.

A server runs detached from the Python process that started it (its own process group,
output to a log file, its pid in a pid file), so `make stack-up` can return and a later
`make stack-down`, another process, can stop it through the pid file.

Raises `StackError` for everything that goes wrong here: a missing tool, a failed
download, a port already taken, a server that exits or never becomes ready.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

_POLL_S = 0.1


class StackError(RuntimeError):
    """A local server could not be prepared, started, reached or stopped."""


def free_port() -> int:
    """Return a TCP port on the loopback interface that nothing listens on right now.

    The OS picks it from the ephemeral range; another process may still take it before the
    caller binds it, which tests accept.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_port_free(port: int, what: str) -> None:
    """Raise `StackError` if something already listens on `port` (loopback).

    SO_REUSEADDR mirrors what the JVM sets on its server sockets: connections of a stopped
    server that linger in TIME_WAIT do not block a restart, only a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise StackError(f"{what} port {port} is already in use: {exc}") from exc


def port_accepts(port: int, host: str = "localhost") -> bool:
    """Whether a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_tool(name: str) -> str:
    """Return the absolute path of an executable on PATH, or raise `StackError`."""
    path = shutil.which(name)
    if path is None:
        raise StackError(f"`{name}` is not on PATH; the local stack needs it")
    return path


def resolve_jars(pom: Path, lib_dir: Path) -> bool:
    """Copy the run-time dependencies of `pom` into `lib_dir`, unless they are already there.

    Maven's local repository (~/.m2) caches the downloads across runs. `lib_dir` holds a
    stamp with the pom's SHA-256; a matching stamp means the jars are complete and current.
    The jars are copied into a temporary folder that replaces `lib_dir` only when Maven
    succeeded, so an interrupted download never passes for a complete one. A lock file
    beside `lib_dir` keeps two launchers from resolving at once.

    Returns True when Maven ran, False when the stamp matched.
    """
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    stamp = lib_dir / ".pom-sha256"
    lib_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(lib_dir.with_name(lib_dir.name + ".lock")):
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return False
        staging = lib_dir.with_name(lib_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            require_tool("mvn"),
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            output = (result.stdout + result.stderr).strip()
            raise StackError(
                f"resolving {pom.name} with Maven failed (exit {result.returncode}):\n"
                f"{_tail(output, 40)}"
            )
        (staging / ".pom-sha256").write_text(digest + "\n")
        shutil.rmtree(lib_dir, ignore_errors=True)
        staging.rename(lib_dir)
        return True


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class DetachedProcess:
    """One server process, known by a pid file, whoever started it.

    The pid file holds the pid and the process's start time (from /proc), so a stale pid
    file, or a pid that the OS has since given to another program, is never signalled.
    """

    def __init__(self, name: str, pid_file: Path, log_file: Path) -> None:
        self.name = name
        self.pid_file = pid_file
        self.log_file = log_file
        # Set only in the process that started the server; used to reap it (no zombie).
        self._child: subprocess.Popen[bytes] | None = None

    def start(self, argv: Sequence[str], *, cwd: Path) -> None:
        """Start `argv` in its own session and process group; output goes to the log file."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self._child = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A new session: Ctrl-C in the launching terminal or the end of a pytest run
                # does not signal the server; stop() and kill() signal its whole group.
                start_new_session=True,
            )
        pid = self._child.pid
        self.pid_file.write_text(f"{pid} {_start_time(pid)}\n")

    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        if self._child is not None:
            # We started it: the child handle is the truth, whatever the pid file says.
            return self._child.pid if self._child.poll() is None else None
        try:
            pid_text, start_text = self.pid_file.read_text().split()
            pid, started = int(pid_text), int(start_text)
        except (FileNotFoundError, ValueError):
            return None
        return pid if _alive(pid, started) else None

    def is_running(self) -> bool:
        return self.pid() is not None

    def exit_code(self) -> int | None:
        """The exit status, when this process started the server and it has exited."""
        return None if self._child is None else self._child.poll()

    def stop(self, timeout_s: float) -> None:
        """SIGTERM the server's process group, wait up to `timeout_s`, then SIGKILL it."""
        pid = self.pid()
        if pid is not None:
            started = _start_time(pid)
            _signal_group(pid, signal.SIGTERM)
            if not self._wait_gone(pid, started, timeout_s):
                _signal_group(pid, signal.SIGKILL)
                if not self._wait_gone(pid, started, 10):
                    raise StackError(f"{self.name} (pid {pid}) survived SIGKILL")
        self._forget()

    def kill(self) -> None:
        """SIGKILL the server's process group now and wait until it is gone."""
        pid = self.pid()
        if pid is not None:
            started = _start_time(pid)
            _signal_group(pid, signal.SIGKILL)
            if not self._wait_gone(pid, started, 10):
                raise StackError(f"{self.name} (pid {pid}) survived SIGKILL")
        self._forget()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return _tail(text, lines)

    def _forget(self) -> None:
        self.pid_file.unlink(missing_ok=True)
        # Reap our own child if another process stopped it, so it leaves no zombie and
        # the Popen object no "still running" warning.
        if self._child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(timeout=5)

    def _wait_gone(self, pid: int, started: int | None, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._child is not None and self._child.pid == pid:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._child.wait(timeout=_POLL_S)
                if self._child.returncode is not None:
                    return True
            elif started is None or not _alive(pid, started):
                return True
            else:
                time.sleep(_POLL_S)
            if time.monotonic() >= deadline:
                return False


def _stat_fields(stat_file: Path) -> list[str] | None:
    """The fields of a /proc stat file after the command name, which may hold spaces."""
    try:
        text = stat_file.read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot; None if there is no such pid."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    # Field 22 of stat; the list starts at field 3 (the state).
    return None if fields is None else int(fields[19])


def _alive(pid: int, started: int) -> bool:
    """Whether the process that started at `started` still has a thread that is not dead.

    A JVM's main thread can exit before its other threads finish the shutdown hooks, so
    every thread is looked at, not only the first: the server is gone (its ports free)
    only when all of them are zombies or gone.
    """
    if _start_time(pid) != started:
        return False
    for task in Path(f"/proc/{pid}/task").glob("*/stat"):
        fields = _stat_fields(task)
        if fields is not None and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # The server leads its own process group (start_new_session), so its pgid is its pid.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])
