"""`serve` with `workers: N > 1`: N worker processes share the port (SO_REUSEPORT).

Starts each worker as `llm-proxy serve` on the same config, forwards SIGTERM/SIGINT/SIGHUP,
restarts a worker that dies (with backoff), and exits once every worker has exited. It serves
no traffic itself and keeps no state but the workers' PIDs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from .config import Config

log = logging.getLogger("llm_proxy.supervisor")

WORKER_ENV = "LLM_PROXY_WORKER_OF"  # set in workers: how many share the port
BACKOFF_S = (0.5, 1, 2, 5, 10, 30)
STABLE_S = 30.0  # a worker that lived this long restarts without backoff
# The workers' shared metrics directory: `<prefix><supervisor pid>-<random>` in the temp dir.
METRICS_DIR_PREFIX = "llm-proxy-metrics-"


def remove_orphaned_metrics_dirs(parent: str) -> list[str]:
    """Removes the metrics directories in `parent` whose supervisor is gone (killed with
    SIGKILL, it could not); returns them. A directory whose PID is alive again is kept."""
    removed = []
    for entry in os.scandir(parent):
        pid_text = entry.name[len(METRICS_DIR_PREFIX):].partition("-")[0]
        if not (entry.name.startswith(METRICS_DIR_PREFIX) and entry.is_dir() and pid_text.isdigit()):
            continue
        if not _alive(int(pid_text)):
            shutil.rmtree(entry.path, ignore_errors=True)
            if not os.path.exists(entry.path):  # not someone else's, beyond our permissions
                removed.append(entry.path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0


def supervise(config: Config, *, path: str) -> int:
    logging.basicConfig(
        level=config.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    for orphan in remove_orphaned_metrics_dirs(tempfile.gettempdir()):
        log.info("removed %s, left by a supervisor that no longer runs", orphan)
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    env = {**os.environ, WORKER_ENV: str(config.server.workers), "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    command = [
        sys.executable, "-m", "proxy", "serve", "--config", path,
        "--host", config.server.host, "--port", str(config.server.port),
    ]
    workers = [Worker(slot) for slot in range(config.server.workers)]
    stopping = _install_signals(workers)
    try:
        while not (stopping[0] and all(w.process is None for w in workers)):
            for worker in workers:
                _tend(worker, command, env, stopping=stopping[0], metrics_dir=metrics_dir)
            time.sleep(0.1)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers exited")
    return 0


def _install_signals(workers: list[Worker]) -> list[bool]:
    stopping = [False]

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGHUP:
            stopping[0] = True
        for worker in workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    return stopping


def _tend(worker: Worker, command: list[str], env: dict[str, str], *, stopping: bool, metrics_dir: str) -> None:
    """Starts a missing worker when due; notices one that exited."""
    now = time.monotonic()
    process = worker.process
    if process is not None:
        code = process.poll()
        if code is None:
            return
        _mark_dead(process.pid, metrics_dir)
        worker.process = None
        if stopping:
            return
        lived = now - worker.started
        worker.failures = 0 if lived >= STABLE_S else worker.failures + 1
        delay = BACKOFF_S[min(worker.failures, len(BACKOFF_S) - 1)] if worker.failures else 0.0
        worker.restart_at = now + delay
        log.warning("worker %d (pid %d) exited with %s; restarting in %gs", worker.slot, process.pid, code, delay)
    if stopping or now < worker.restart_at:
        return
    worker.process = subprocess.Popen(command, env=env)
    worker.started = now
    log.info("worker %d started (pid %d)", worker.slot, worker.process.pid)


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drops a dead worker's live gauges; its counters stay in the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
