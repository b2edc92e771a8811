"""What every scenario uses: the run's settings, its upstreams, and hops started and measured.

A `Bench` owns the run's processes (through `Procs`): the upstreams live for the whole run,
each llm-proxy or floor only for its scenario. Measurements snapshot the hop's CPU around the
load so that CPU per request covers exactly the measured requests' work.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from .configs import DEFAULT, Step, gateway_config, write_config
from .load import run_wrk
from .procs import Cores, Proc, ProcError, Procs, core_busy_seconds, free_port, wait_listening
from .streams import DONE, stream_load, summarize
from .upstreams import redis_commands, start_nginx, start_redis, start_sse

MIB = 1024 * 1024


@dataclass(frozen=True)
class Params:
    mode: str
    warmup_s: float
    seconds: float
    hold_count: int  # scenario d: concurrent slow streams ...
    hold_chunks: int  # ... of this many chunks ...
    hold_gap_ms: int  # ... this far apart
    time_limit_s: float  # the whole run is stopped past this
    connections: int = 50
    stream_concurrency: int = 50
    stream_chunks: int = 20
    stream_gap_ms: int = 20
    rounds: int = 1  # (a) and (b) are measured this many times, interleaved; figures are medians
    body_sizes: tuple[int, ...] = (1024, 100 * 1024, 1024 * 1024)


QUICK = Params("quick", warmup_s=1, seconds=2, hold_count=1000, hold_chunks=10, hold_gap_ms=300,
               time_limit_s=240)
FULL = Params("full", warmup_s=1, seconds=8, hold_count=10_000, hold_chunks=15, hold_gap_ms=2000,
              time_limit_s=900, rounds=3)


@dataclass
class Hop:
    """A running hop under test (llm-proxy or the floor) and where to send requests."""

    proc: Proc
    base: str  # http://127.0.0.1:port

    @property
    def chat_url(self) -> str:
        return self.base + "/v1/chat/completions"


def gateway_argv() -> list[str]:
    script = Path(sys.executable).with_name("llm-proxy")
    return [str(script)] if script.exists() else [sys.executable, "-m", "proxy"]


class Bench:
    def __init__(self, procs: Procs, params: Params, cores: Cores) -> None:
        self.procs = procs
        self.params = params
        self.cores = cores
        self.workdir = procs.workdir
        self.started = time.monotonic()
        self.nginx = ""
        self.sse = ""
        self._redis: tuple[str, Proc] | None = None
        self.redis_overhead = 0  # commands Redis counts for one look at its counter

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def start_upstreams(self) -> None:
        self.nginx = start_nginx(self.procs, self.cores)
        self.sse = start_sse(self.procs, self.cores)
        self.log(f"upstreams: nginx {self.nginx}, SSE server {self.sse}")

    def redis(self) -> str:
        """The URL of the run's redis-server, started on first use."""
        if self._redis is None:
            self._redis = start_redis(self.procs, self.cores)
            self.log(f"redis-server {self._redis[0]}")
            first = redis_commands(self._redis[0])
            self.redis_overhead = redis_commands(self._redis[0]) - first
        return self._redis[0]

    def redis_counters(self) -> tuple[int, float]:
        """Commands Redis has processed and its CPU seconds so far."""
        assert self._redis is not None
        return redis_commands(self._redis[0]), self._redis[1].cpu_seconds()

    def start_gateway(
        self, name: str, providers: dict[str, Any], *, step: Step = DEFAULT, workers: int = 1,
        config: dict[str, Any] | None = None,
    ) -> Hop:
        port = free_port()
        config = config or gateway_config(
            port=port, providers=providers, step=step, redis_url=self.redis() if step.redis else ""
        )
        config["server"]["port"] = port
        path = write_config(self.workdir / f"{name}.yaml", config)
        with open(self.workdir / f"{name}.stdout", "wb") as stdout:  # the access log, if on
            argv = [*gateway_argv(), "serve", "--config", str(path), "--workers", str(workers)]
            cores = self.cores.gateway if workers == 1 else self.cores.workers()
            proc = self.procs.start(name, argv, cores=cores, stdout=stdout)
        hop = Hop(proc, f"http://127.0.0.1:{port}")
        try:
            wait_listening(proc, port)
            wait_ready(hop)
        except ProcError:
            self.procs.stop(proc)
            raise
        return hop

    def start_floor(self, upstream: str, client: str = "aiohttp") -> Hop:
        port = free_port()
        argv = [sys.executable, "-m", "bench.floor", "--port", str(port), "--upstream", upstream,
                "--client", client]
        proc = self.procs.start("floor", argv, cores=self.cores.gateway)
        try:
            wait_listening(proc, port)
        except ProcError:
            self.procs.stop(proc)
            raise
        return Hop(proc, f"http://127.0.0.1:{port}")

    @contextlib.contextmanager
    def gateway(self, name: str, providers: dict[str, Any], **options: Any) -> Iterator[Hop]:
        hop = self.start_gateway(name, providers, **options)
        try:
            yield hop
        finally:
            self.procs.stop(hop.proc)

    @contextlib.contextmanager
    def floor(self, upstream: str, client: str = "aiohttp") -> Iterator[Hop]:
        hop = self.start_floor(upstream, client)
        try:
            yield hop
        finally:
            self.procs.stop(hop.proc)

    def measure(
        self, hop: Hop | None, url: str, script: Path, label: str, *, redis: bool = False
    ) -> dict[str, Any]:
        """wrk warm-up, then the measured run; CPU µs per request of `hop`'s process tree (and of
        redis-server, with the commands it got per request, when `redis`)."""
        params = self.params
        run_wrk(url, script, connections=params.connections, seconds=params.warmup_s, cores=self.cores)
        redis_before = self.redis_counters() if redis else (0, 0.0)
        cpu_before = hop.proc.cpu_seconds() if hop else 0.0
        core_before = core_busy_seconds(self.cores.gateway)
        result = run_wrk(url, script, connections=params.connections, seconds=params.seconds, cores=self.cores)
        time.sleep(0.1)  # the requests wrk abandoned at its deadline finish their work
        row: dict[str, Any] = result.as_dict()
        requests = max(1, result.requests)
        if hop is not None:
            cpu = hop.proc.cpu_seconds() - cpu_before
            row["cpu_us"] = cpu / requests * 1e6
            row["cpu_util"] = cpu / result.seconds
            row["rss_mib"] = hop.proc.rss_bytes() / MIB
            row["core_other_pct"] = self.other_load(core_before, cpu, result.seconds)
        if redis:
            commands, redis_cpu = self.redis_counters()
            row["redis_per_req"] = (commands - redis_before[0] - self.redis_overhead) / requests
            row["redis_cpu_us"] = (redis_cpu - redis_before[1]) / requests * 1e6
        self.log(f"  {label}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms"
                 + (f", {row['cpu_us']:.0f} µs CPU/req" if hop else "") + other_note(row)
                 + (f", {result.errors} errors" if result.errors else ""))
        return row

    def measure_streams(
        self, hop: Hop | None, url: str, body: bytes, label: str, *, done: bytes = DONE
    ) -> dict[str, Any]:
        """`stream_concurrency` streams back to back: warm-up, then measured; CPU µs per completed
        stream of `hop`'s process tree."""
        params = self.params

        def probe() -> tuple[float, float]:
            return (hop.proc.cpu_seconds() if hop else 0.0), core_busy_seconds(self.cores.gateway)

        samples, seconds, (before, after) = uvloop.run(stream_load(
            url, body, concurrency=params.stream_concurrency, warmup_s=params.warmup_s,
            seconds=params.seconds, probe=probe, done=done,
        ))
        row = summarize(samples, seconds)
        row["errors_total"] = sum(row["errors"].values())
        if hop is not None:
            cpu = after[0] - before[0]
            row["cpu_us"] = cpu / max(1, len(samples)) * 1e6
            row["core_other_pct"] = self.other_load(before[1], cpu, seconds, after[1])
        self.log(f"  {label}: {row['streams_per_s']:,.0f} streams/s, TTFB p50 {row['ttfb_p50_ms'] or 0:.2f} ms"
                 + (f", {row['cpu_us']:.0f} µs CPU/stream" if hop else "")
                 + other_note(row) + (f", errors {row['errors']}" if row["errors"] else ""))
        return row

    def other_load(
        self, core_before: float, hop_cpu: float, seconds: float, core_after: float | None = None
    ) -> float | None:
        """Per cent of the gateway core used by other processes while the hop was measured."""
        if self.cores.gateway is None or seconds <= 0:
            return None
        if core_after is None:
            core_after = core_busy_seconds(self.cores.gateway)
        others = core_after - core_before - hop_cpu
        return max(0.0, others) / seconds * 100


def wait_ready(hop: Hop, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(hop.base + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if not hop.proc.alive():
            break
        time.sleep(0.05)
    raise ProcError(f"{hop.proc.name} did not become ready:\n{hop.proc.log_tail()}", hop.proc)


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median over `rows` (one per round); text from the first; CPU's range."""
    merged: dict[str, Any] = {}
    for key, first in rows[0].items():
        values = [row[key] for row in rows if isinstance(row.get(key), (int, float))]
        merged[key] = statistics.median(values) if isinstance(first, (int, float)) and values else first
    cpu = [row["cpu_us"] for row in rows if "cpu_us" in row]
    if len(cpu) > 1:
        merged["cpu_us_range"] = f"{min(cpu):,.0f}–{max(cpu):,.0f}"
    return merged


def other_note(row: dict[str, Any]) -> str:
    other = row.get("core_other_pct")
    return f" (other processes took {other:.0f}% of the gateway core)" if other and other >= 5 else ""


def with_ratios(
    row: dict[str, Any], floor: dict[str, Any], keys: tuple[str, ...], suffix: str = "floor"
) -> dict[str, Any]:
    """Adds `<key>_x_<suffix>` = row[key] / floor[key] for each key both have."""
    for key in keys:
        mine, theirs = row.get(key), floor.get(key)
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs:
            row[f"{key}_x_{suffix}"] = mine / theirs
    return row
