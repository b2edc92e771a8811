"""The processes of a benchmark run: started pinned to a core, stopped by PID, CPU and RSS read.

Every process is started in its own process group and registered in `Procs`, which stops each
one by its PID (then any member left in its group, by PID) when the run ends, whatever happened. CPU and
RSS come from /proc and cover a process and all its descendants.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Cores:
    """Which cores the measured hop and everything else run on (`None`: not pinned)."""

    gateway: str | None
    load: str | None
    spare: str | None = None  # a third core, for a second gateway worker

    @classmethod
    def detect(cls) -> Cores:
        usable = [str(core) for core in sorted(os.sched_getaffinity(0))]
        if len(usable) < 2:
            return cls(gateway=None, load=None)
        return cls(gateway=usable[0], load=usable[1], spare=usable[2] if len(usable) > 2 else None)

    def workers(self) -> str | None:
        """Cores for a two-worker gateway: its own two when there are, else the gateway core."""
        return f"{self.gateway},{self.spare}" if self.spare else self.gateway

    def describe(self) -> str:
        if self.gateway is None:
            return "not pinned (fewer than 2 usable cores): all processes share the CPU"
        return (
            f"gateway under test (llm-proxy or the floor) pinned to core {self.gateway}; "
            f"wrk, the SSE client (this harness), nginx, the SSE upstream and redis-server "
            f"pinned to core {self.load} (taskset -c)"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_open_files() -> int:
    """Raises this process's soft open-files limit to its hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def tree_pids(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in _listdir(f"/proc/{current}/task"):
            try:
                children = Path(f"/proc/{current}/task/{task}/children").read_text()
            except OSError:
                continue
            pending += [int(child) for child in children.split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid`'s tree, including reaped children (cutime, cstime)."""
    ticks = 0
    for member in tree_pids(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the command name: state is fields[0]; utime, stime, cutime, cstime are 11..14
        ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLOCK_TICKS


def core_busy_seconds(core: str | None) -> float:
    """user + nice + system time of one core (all cores when None), from /proc/stat."""
    name = "cpu" if core is None else f"cpu{core}"
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == name:
            return sum(int(value) for value in fields[1:4]) / CLOCK_TICKS
    return 0.0


def rss_bytes(pid: int) -> int:
    total = 0
    for member in tree_pids(pid):
        try:
            total += int(Path(f"/proc/{member}/statm").read_text().split()[1]) * PAGE_SIZE
        except OSError:
            continue
    return total


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class Proc:
    """One started process: its PID, its log file, and what /proc says about it."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcError(RuntimeError):
    """A process that failed to start; `proc` says how it ended."""

    def __init__(self, message: str, proc: Proc | None = None) -> None:
        super().__init__(message)
        self.proc = proc


class Procs:
    """Starts processes and guarantees they are stopped: use as a context manager."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[Proc] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: list[str], *, cores: str | None, stdout: IO[bytes] | int | None = None
    ) -> Proc:
        log_path = self.workdir / f"{name}.log"
        command = (["taskset", "-c", cores] if cores is not None else []) + argv
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log if stdout is None else stdout,
                stderr=log,
                start_new_session=True,  # its own process group, stopped with it
            )
        proc = Proc(name, popen, log_path)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 5.0) -> int | None:
        """SIGTERM to its PID, SIGKILL if it lingers, then to any member left in its group."""
        if proc in self.running:
            self.running.remove(proc)
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout_s)
        # While a member lives, its group id cannot be handed to another process: these are ours.
        for pid in group_members(proc.pid):
            _kill(pid)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in _listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # state, ppid, pgrp
                members.append(int(entry))
    return members


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_listening(proc: Proc, port: int, timeout_s: float = 15.0) -> None:
    """Returns once `port` accepts connections; ProcError if `proc` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}", proc)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise ProcError(f"{proc.name} did not listen on {port} within {timeout_s:g}s:\n{proc.log_tail()}", proc)
