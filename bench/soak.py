"""`python -m bench.soak [--minutes M] [--quick]`: minutes of mixed traffic with faults, watching for leaks.

Owns the soak: it starts redis-server, the fault upstream (`bench.faultupstream`) and llm-proxy as
real processes on loopback (through `Procs`, so all are stopped by PID whatever happens), drives
JSON and streamed requests from a bounded set of clients (some leaving midway), samples the
gateway's RSS, open files, in-flight requests and Redis concurrency leases over time, and checks
that every request got one answer and that nothing is left held once traffic stops. It measures
leaks, not speed: nothing is pinned. Writes `bench/results/<time>-soak.md` and `.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from proxy.limitscript import KeyNames
from proxy.ratelimit import CONCURRENCY, Bucket
from proxy.redislimits import LEASE_TTL_S

from .configs import write_config
from .faultupstream import WORDS
from .harness import Hop, gateway_argv, wait_ready
from .procs import Cores, Proc, ProcError, Procs, free_port, raise_open_files, wait_listening
from .report import RESULTS, machine
from .upstreams import find_tool, start_redis

CLIENT_KEY = "sk-soak-client"
KEY_NAME = "soak"
ADMIN_KEY = "adm-soak"
# Mostly healthy accounts with a few faulty ones, and a provider with nothing but faults.
MIXED_ACCOUNTS = ("ok", "ok.2", "ok.3", "ok.4", "slow", "slow.2", "reset", "s500", "s529", "s429",
                  "cut_body", "stall", "hang")
# No `s400` here: its 400 is the caller's fault, never opens its breaker, and would take all of it.
FAULTY_ACCOUNTS = ("cut_head", "garbage", "bad_chunk", "not_object", "rst", "s401", "s500", "s529",
                   "stall", "hang")
MODELS = (("soak-mixed", 0.75), ("soak-faulty", 0.25))  # (model, share of requests)
ANSWER_LIMIT_S = 30.0  # a request unanswered this long counts as hung
LEASE_KEY = KeyNames().bucket(Bucket("key", KEY_NAME, CONCURRENCY, 1))
# The gateway renews the lease of every request it holds every third of LEASE_TTL_S, so a held
# lease always expires at least 2/3 of it ahead (less a few seconds for a slow renewal call): one
# closer to its end is held by no request, a concurrency slot lost until it expires.
STALE_BELOW_S = LEASE_TTL_S * 2 / 3 - 5


@dataclass(frozen=True)
class Params:
    seconds: float
    interval_s: float  # between samples
    clients: int = 50
    concurrency: int = 40  # the key's limit: below the clients, so leases are also refused
    leave_share: float = 0.1  # of requests whose client closes the connection after 10-500 ms
    settle_s: float = 20.0  # after traffic, how long in-flight and leases may take to reach 0
    max_requests: int = 2_000_000


def soak_config(*, port: int, upstream: str, redis_url: str, concurrency: int) -> dict[str, Any]:
    """Short timeouts and breakers that reopen quickly, so faults resolve and recur all along."""
    provider = {
        "type": "openai", "base_url": upstream,
        "timeouts": {"connect_s": 1, "first_byte_s": 1, "idle_s": 1, "total_s": 5},
        "breaker": {"consecutive_failures": 5, "failure_rate": 0.5, "min_requests": 20,
                    "window_s": 10, "open_s": 2, "max_open_s": 5, "half_open_probes": 1},
    }
    providers = {
        name: {**provider, "accounts": [{"name": account, "api_key": f"sk-{account}"} for account in accounts]}
        for name, accounts in (("mixed", MIXED_ACCOUNTS), ("faulty", FAULTY_ACCOUNTS))
    }
    return {
        "server": {"host": "127.0.0.1", "port": port, "drain_delay_s": 0, "shutdown_grace_s": 2,
                   "admin_key": ADMIN_KEY},
        "redis": {"url": redis_url, "timeout_ms": 500},
        "keys": [{"name": KEY_NAME, "key": CLIENT_KEY,
                  "limits": {"concurrency": concurrency, "rpm": 100_000, "tpm": 20_000_000}}],
        "providers": providers,
        "models": {"soak-mixed": {"targets": [{"provider": "mixed"}]},
                   "soak-faulty": {"targets": [{"provider": "faulty"}]}},
        "routing": {"max_attempts": 3},
        "logging": {"level": "warning", "access_log": True, "metrics": True},
    }


@dataclass
class Stack:
    """The running processes and where they listen."""

    gateway: Proc
    base: str
    port: int
    upstream_port: int
    redis_url: str
    redis_port: int


def start_stack(procs: Procs, params: Params) -> Stack:
    cores = Cores(gateway=None, load=None)  # a soak looks for leaks: nothing is pinned
    redis_url, _ = start_redis(procs, cores)
    upstream_port = free_port()
    upstream = procs.start("fault-upstream", [sys.executable, "-m", "bench.faultupstream", str(upstream_port)],
                           cores=None)
    wait_listening(upstream, upstream_port)
    port = free_port()
    config = soak_config(port=port, upstream=f"http://127.0.0.1:{upstream_port}/v1", redis_url=redis_url,
                         concurrency=params.concurrency)
    path = write_config(procs.workdir / "gateway.yaml", config)
    with open(procs.workdir / "gateway.stdout", "wb") as stdout:  # the access log
        gateway = procs.start("gateway", [*gateway_argv(), "serve", "--config", str(path)], cores=None,
                              stdout=stdout)
    base = f"http://127.0.0.1:{port}"
    wait_listening(gateway, port)
    wait_ready(Hop(gateway, base))
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    return Stack(gateway, base, port, upstream_port, redis_url, redis_port)


@dataclass
class Tally:
    """What clients got: answers by status and error code, clients that left, violations."""

    answers: Counter[str] = field(default_factory=Counter)
    left: int = 0
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def done(self) -> int:
        return sum(self.answers.values()) + self.left + sum(self.violations.values())

    def violation(self, reason: str, detail: str) -> None:
        self.violations[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{reason}: {detail[:300]}")


def error_code(body: bytes) -> str | None:
    """The code of an OpenAI-shaped error (all four keys present) and its param if any, else None."""
    try:
        error = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return None
    code = "null" if error["code"] is None else str(error["code"])
    return code if error["param"] is None else f"{code} ({error['param']})"


def stream_ending(body: bytes) -> str | None:
    """`[DONE]` after the full text, or `error <code>` for one terminal error event; else None."""
    events = [event for event in body.split(b"\n\n") if event.strip()]
    if not events or any(not e.startswith(b"data: {") or b'"error"' in e for e in events[:-1]):
        return None
    if events[-1] != b"data: [DONE]":
        code = error_code(events[-1].removeprefix(b"data: "))
        return None if code is None else f"error {code}"
    text = ""
    for event in events[:-1]:
        for choice in orjson.loads(event[6:]).get("choices") or ():
            text += choice.get("delta", {}).get("content") or ""
    return "[DONE]" if text.split() == list(WORDS) else None


def check_answer(status: int, headers: Any, body: bytes, stream: bool) -> tuple[str, str | None]:
    """(how it is counted, why it breaks the invariant or None): one complete answer or one
    explicit error, with `x-request-id`."""
    if not headers.get("x-request-id"):
        return str(status), "no x-request-id"
    if status == 200 and stream:
        ending = stream_ending(body)
        return f"200 stream {ending}", None if ending else "stream neither complete nor one error event"
    if status == 200:
        try:
            text = orjson.loads(body)["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            text = None
        return "200", None if text == " ".join(WORDS) else "200 without a complete chat.completion"
    code = error_code(body)
    return f"{status} {code}", None if code else "error without an OpenAI-shaped body"


@dataclass(frozen=True)
class Plan:
    model: str
    stream: bool
    usage: bool  # streams: ask for include_usage
    leave_after_s: float | None


def plan_request(rng: random.Random, params: Params) -> Plan:
    model = rng.choices([name for name, _ in MODELS], [share for _, share in MODELS])[0]
    stream = rng.random() < 0.5
    leave = rng.uniform(0.01, 0.5) if rng.random() < params.leave_share else None
    return Plan(model, stream, stream and rng.random() < 0.5, leave)


async def one_request(http: aiohttp.ClientSession, url: str, plan: Plan, tally: Tally) -> int:
    """Sends one request and counts what came back; its status (0 when none)."""
    body: dict[str, Any] = {"model": plan.model, "stream": plan.stream, "max_tokens": 16,
                            "messages": [{"role": "user", "content": "count to five"}]}
    if plan.usage:
        body["stream_options"] = {"include_usage": True}
    headers = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
    leave = asyncio.timeout(plan.leave_after_s)
    hung = asyncio.timeout(ANSWER_LIMIT_S)
    try:
        async with hung, leave, http.post(url, data=orjson.dumps(body), headers=headers) as response:
            data = await response.read()
    except TimeoutError:
        if leave.expired():
            tally.left += 1  # the client left: the connection is closed under the gateway
        else:
            tally.violation("no answer within 30 s", f"{plan}")
        return 0
    except aiohttp.ClientError as exc:
        tally.violation(f"connection failed: {type(exc).__name__}", f"{plan}: {exc}")
        return 0
    label, broken = check_answer(response.status, response.headers, data, plan.stream)
    tally.answers[label] += 1
    if broken:
        tally.violation(broken, f"{plan}: {response.status} {data[-300:]!r}")
    return response.status


async def client(http: aiohttp.ClientSession, url: str, seed: int, params: Params, until: float,
                 tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until and tally.done < params.max_requests:
        status = await one_request(http, url, plan_request(rng, params), tally)
        if status == 429:  # as a client honouring Retry-After would, briefly
            await asyncio.sleep(rng.uniform(0.05, 0.25))


async def drive(base: str, params: Params, tally: Tally) -> None:
    """`params.clients` clients sending requests one after another until the time is up."""
    url = base + "/v1/chat/completions"
    until = time.monotonic() + params.seconds
    connector = aiohttp.TCPConnector(limit=params.clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as http:
        await asyncio.gather(*(client(http, url, seed, params, until, tally) for seed in range(params.clients)))


def socket_ports() -> dict[str, tuple[int, int]]:
    """inode -> (local port, remote port) of every TCP socket on the machine."""
    found: dict[str, tuple[int, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            found[fields[9]] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return found


def open_files(pid: int, stack: Stack) -> dict[str, int]:
    """The gateway's open file descriptors: in all, and its sockets to the upstream, from clients
    and to Redis (told apart by port)."""
    counts = Counter(fds=0, upstream=0, clients=0, redis=0)
    ports = socket_ports()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        counts["fds"] += 1
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        local, remote = ports.get(target.removeprefix("socket:[").rstrip("]"), (0, 0))
        if remote == stack.upstream_port:
            counts["upstream"] += 1
        elif remote == stack.redis_port:
            counts["redis"] += 1
        elif local == stack.port and remote:
            counts["clients"] += 1
    return dict(counts)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Probe:
    """Reads the gateway's state from outside: /proc, /admin/state, /metrics and Redis."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.redis = aioredis.Redis.from_url(stack.redis_url)
        # a connection per look, so that none of the probe's is open when the fds are counted
        connector = aiohttp.TCPConnector(force_close=True)
        self.http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5))

    async def close(self) -> None:
        await self.http.close()
        await self.redis.aclose()

    async def read(self) -> dict[str, Any]:
        pid = self.stack.gateway.pid
        row: dict[str, Any] = {"rss_mib": rss_mib(pid), **open_files(pid, self.stack)}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with self.http.get(self.stack.base + "/admin/state", headers=admin) as response:
            accounts = (await response.json())["accounts"]
        row["inflight"] = sum(account["inflight"] for account in accounts)
        row["breakers_open"] = sum(account["breaker"] != "closed" for account in accounts)
        async with self.http.get(self.stack.base + "/metrics") as response:
            text = await response.text()
        row["inflight_metric"] = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                     if line.startswith("llm_proxy_inflight_requests{"))
        row.update(await self.leases())
        return row

    async def leases(self) -> dict[str, Any]:
        """The key's concurrency leases in Redis (ZCARD), and how far off the last one expires."""
        members = await self.redis.zrange(LEASE_KEY, 0, -1, withscores=True)
        seconds, micros = await self.redis.time()
        now = seconds + micros / 1e6
        # ZCARD counts expired leases too: Redis drops them only when an admission looks
        return {"leases": len(members), "leases_live": sum(score > now for _, score in members),
                "leases_stale": sum(score - now < STALE_BELOW_S for _, score in members),
                "lease_expiry_s": max((score - now for _, score in members), default=0.0)}


async def sample(probe: Probe, started: float, tally: Tally, last: dict[str, Any] | None) -> dict[str, Any]:
    now = time.monotonic()
    row = {"t_s": now - started, **await probe.read(), "done": tally.done, "left": tally.left,
           "violations": sum(tally.violations.values())}
    for kind in ("2", "4", "5"):
        row[f"{kind}xx"] = sum(n for label, n in tally.answers.items() if label.startswith(kind))
    span = now - started - (last["t_s"] if last else 0.0)
    row["req_s"] = (row["done"] - (last["done"] if last else 0)) / span if span > 0 else 0.0
    return row


COLUMNS = (("t s", "t_s", "{:.0f}"), ("req/s", "req_s", "{:,.0f}"), ("RSS MiB", "rss_mib", "{:.1f}"),
           ("open fds", "fds", "{}"), ("upstream sockets", "upstream", "{}"), ("client sockets", "clients", "{}"),
           ("in flight", "inflight", "{}"), ("leases", "leases", "{}"),
           ("stale leases", "leases_stale", "{}"), ("breakers not closed", "breakers_open", "{}"),
           ("2xx", "2xx", "{:,}"), ("4xx", "4xx", "{:,}"), ("5xx", "5xx", "{:,}"), ("left", "left", "{:,}"),
           ("violations", "violations", "{}"))


def table_head() -> list[str]:
    return ["| phase | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
            "|---|" + "|".join("---" for _ in COLUMNS) + "|"]


def table_row(row: dict[str, Any]) -> str:
    return f"| {row['phase']} | " + " | ".join(form.format(row[key]) for _, key, form in COLUMNS) + " |"


async def watch(probe: Probe, params: Params, tally: Tally) -> list[dict[str, Any]]:
    """An idle sample, then traffic with a sample every `interval_s` (each row printed as it comes),
    then one once nothing is held."""
    started = time.monotonic()
    rows = [{**await sample(probe, started, tally, None), "phase": "idle"}]
    print("\n".join(table_head() + [table_row(rows[0])]), flush=True)
    traffic = asyncio.create_task(drive(probe.stack.base, params, tally))
    try:
        while not traffic.done():
            await asyncio.wait([traffic], timeout=params.interval_s)
            rows.append({**await sample(probe, started, tally, rows[-1]), "phase": "traffic"})
            print(table_row(rows[-1]), flush=True)
        await traffic  # a client that failed in an unforeseen way stops the soak here
    finally:
        traffic.cancel()
        await asyncio.gather(traffic, return_exceptions=True)
    rows.append(await after_traffic(probe, params, tally, started, rows[-1]))
    print(table_row(rows[-1]), flush=True)
    return rows


async def after_traffic(
    probe: Probe, params: Params, tally: Tally, started: float, last: dict[str, Any]
) -> dict[str, Any]:
    """The first sample with nothing held, or the one at `settle_s`: it then says what stayed."""
    settle_until = time.monotonic() + params.settle_s
    while True:
        await asyncio.sleep(0.5)
        row = {**await sample(probe, started, tally, last), "phase": "after"}
        if settled(row) or time.monotonic() >= settle_until:
            row["settle_s"] = params.settle_s - (settle_until - time.monotonic())
            return row


def settled(row: dict[str, Any]) -> bool:
    return row["inflight"] == 0 and row["inflight_metric"] == 0 and row["leases"] == 0 and row["clients"] == 0


def verdicts(rows: list[dict[str, Any]], tally: Tally, params: Params) -> list[dict[str, Any]]:
    """Each invariant: its name, whether it held, and the figures that say so."""
    idle, after = rows[0], rows[-1]
    traffic = [row for row in rows if row["phase"] == "traffic"]
    warm = next((row for row in traffic if row["t_s"] >= min(60.0, params.seconds / 3)), traffic[0])
    growth = traffic[-1]["rss_mib"] - warm["rss_mib"]
    minutes = max((traffic[-1]["t_s"] - warm["t_s"]) / 60, 1e-9)
    stale = max(row["leases_stale"] for row in rows)
    allowed = max(5.0, 0.1 * warm["rss_mib"])  # allocator caches grow in steps; a leak keeps going
    checks = [
        ("every request got one complete answer or one explicit error with x-request-id",
         not tally.violations, f"{sum(tally.violations.values())} violations in {tally.done:,} requests"),
        ("in flight back to 0", after["inflight"] == 0 and after["inflight_metric"] == 0,
         f"/admin/state {after['inflight']}, /metrics {after['inflight_metric']:g}, {after['settle_s']:.1f} s after traffic"),
        ("concurrency leases back to 0", after["leases"] == 0,
         f"ZCARD {LEASE_KEY} = {after['leases']}" + (
             f", {after['leases_live']} not expired yet; the last expiry {after['lease_expiry_s']:+.0f} s from "
             "now (a lease lasts 60 s from its grant or renewal)" if after["leases"] else "")),
        ("no lease outlived its request", not stale,
         f"at most {stale} leases in a sample were due within {STALE_BELOW_S:g} s, i.e. not renewed"),
        ("open files back near the start figure",
         after["clients"] == 0 and other_fds(after) <= other_fds(idle) + 2 and after["upstream"] <= params.concurrency,
         f"{idle['fds']} idle -> {after['fds']} after ({after['upstream']} idle upstream keep-alives, at most "
         f"the key's concurrency {params.concurrency}; {after['clients']} client sockets)"),
        ("no steady RSS growth", growth <= allowed,
         f"{warm['rss_mib']:.1f} MiB at {warm['t_s']:.0f} s -> {traffic[-1]['rss_mib']:.1f} MiB at "
         f"{traffic[-1]['t_s']:.0f} s: {growth:+.1f} MiB ({growth / minutes:+.2f} MiB/min; allowed {allowed:+.1f})"),
    ]
    return [{"invariant": name, "held": bool(held), "figures": figures} for name, held, figures in checks]


def other_fds(row: dict[str, Any]) -> int:
    """Descriptors that are neither upstream nor client sockets: the listener, Redis, epoll, files."""
    return int(row["fds"] - row["upstream"] - row["clients"])


def gateway_log_errors(proc: Proc) -> dict[str, int]:
    """The gateway's ERROR lines and the exceptions that ended their tracebacks, counted (request
    ids left out, so that one cause counts once)."""
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    found: Counter[str] = Counter()
    for line in lines:
        if " ERROR " in line:
            found[re.sub(r"req_\w+", "<id>", line.split(" ERROR ", 1)[1])] += 1
        elif re.match(r"[\w.]+(Error|Exception)\b", line):  # a traceback's last line
            found[f"raised {line}"] += 1
    return dict(found.most_common(10))


def access_log_outcomes(path: Path) -> dict[str, int]:
    """What the gateway recorded per request (status and error type), from its access log: it
    shows what clients that left never saw."""
    found: Counter[str] = Counter()
    with open(path, "rb") as log:
        for line in log:
            entry = orjson.loads(line)
            found[f"{entry['status']} {entry['error_type'] or ''}".strip()] += 1
    return dict(sorted(found.items()))


def markdown(run: dict[str, Any]) -> str:
    info = run["machine"]
    lines = [f"### Soak: {run['seconds']:g} s of traffic, {run['started']}", "",
             f"Machine: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, Python {info['python']}; "
             f"{info['redis']}. Working tree: {run['commit']}.", "", run["setup"], "", *table_head(), *map(table_row, run["rows"]), ""]
    return "\n".join(lines + summary(run)) + "\n"


def summary(run: dict[str, Any]) -> list[str]:
    """The answers by kind, the invariants, and what the gateway itself recorded."""
    lines = ["| answer | count |", "|---|---|"]
    lines += [f"| {label} | {count:,} |" for label, count in sorted(run["answers"].items())]
    lines += [f"| client left midway | {run['left']:,} |", ""]
    lines += [f"- {'held' if v['held'] else '**FAILED**'}: {v['invariant']} ({v['figures']})" for v in run["verdicts"]]
    lines += [f"- violation: {example}" for example in run["violation_examples"]]
    outcomes = ", ".join(f"{outcome} × {n:,}" for outcome, n in run["access_log"].items())
    lines += ["", f"The gateway's access log: {outcomes}."]
    lines += [f"- gateway log, {n:,} ×: `{line}`" for line, n in run["gateway_errors"].items()]
    return lines


def write(run: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = run["started"].replace(":", "").replace("-", "").replace("T", "-")[:15]
    path = RESULTS / f"{stamp}-soak.md"
    path.write_text(markdown(run))
    path.with_suffix(".json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    return path


def setup_note(params: Params) -> str:
    return (f"{params.clients} clients, each sending one request after another for {params.seconds:g} s "
            f"(half streamed, {MODELS[0][1]:.0%} to `soak-mixed`: accounts {', '.join(MIXED_ACCOUNTS)}; "
            f"{MODELS[1][1]:.0%} to `soak-faulty`: {', '.join(FAULTY_ACCOUNTS)}); {params.leave_share:.0%} "
            f"of requests abandoned by their client after 10-500 ms (it closes the connection). Key limits: concurrency {params.concurrency}, rpm 100,000, "
            f"tpm 20,000,000, shared through Redis. Timeouts: first byte and idle 1 s, total 5 s. "
            f"Samples every {params.interval_s:g} s; the last row is taken once nothing is held (at most "
            f"{params.settle_s:g} s after traffic). Upstream sockets: the gateway's connections to the "
            f"fault upstream, kept alive when idle.")


async def soak(stack: Stack, params: Params) -> dict[str, Any]:
    tally = Tally()
    probe = Probe(stack)
    try:
        rows = await watch(probe, params, tally)
    except (aiohttp.ClientError, OSError) as exc:
        if stack.gateway.alive():
            raise
        message = f"the gateway exited with {stack.gateway.popen.returncode} during the soak"
        raise ProcError(f"{message}:\n{stack.gateway.log_tail(40)}", stack.gateway) from exc
    finally:
        await probe.close()
    return {"rows": rows, "answers": dict(tally.answers), "left": tally.left,
            "violations": dict(tally.violations), "violation_examples": tally.examples,
            "verdicts": verdicts(rows, tally, params)}


def run(params: Params, keep: bool) -> dict[str, Any]:
    raise_open_files()
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-soak-"))
    result: dict[str, Any] = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
                              "seconds": params.seconds, "machine": machine(), "commit": commit(),
                              "params": asdict(params), "setup": setup_note(params)}
    try:
        with Procs(workdir) as procs:
            stack = start_stack(procs, params)
            print(f"soak: gateway {stack.base} (pid {stack.gateway.pid}), work directory {workdir}",
                  file=sys.stderr, flush=True)
            result.update(asyncio.run(soak(stack, params)))
            result["gateway_errors"] = gateway_log_errors(stack.gateway)
            result["access_log"] = access_log_outcomes(procs.workdir / "gateway.stdout")
            result["verdicts"].append({"invariant": "the gateway still runs", "held": stack.gateway.alive(),
                                       "figures": f"pid {stack.gateway.pid}"})
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def commit() -> str:
    """The commit measured; `-dirty` when the working tree differs from it (edits in progress run too)."""
    done = subprocess.run(["git", "describe", "--always", "--dirty", "--exclude", "*"], check=False,
                          capture_output=True, text=True, timeout=10)
    return done.stdout.strip() or "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="traffic duration (default 3)")
    parser.add_argument("--quick", action="store_true", help="30 s of traffic, a sample every 2 s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (config, logs)")
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwinds through the finally blocks that stop every process


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if find_tool("redis-server") is None:
        print("soak: redis-server is missing: sudo apt-get install -y redis-server", file=sys.stderr)
        return 2
    params = Params(30.0, 2.0) if args.quick else Params(args.minutes * 60, 5.0)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGALRM, _terminate)
    signal.alarm(int(params.seconds + params.settle_s + ANSWER_LIMIT_S + 90))  # the whole run, bounded
    try:
        result = run(params, args.keep)
    except ProcError as exc:  # the gateway failed to start or died: that is the finding
        print(f"soak: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
    path = write(result)
    print("\n" + "\n".join(summary(result)))
    print(f"soak: written {path} (+ .json)", file=sys.stderr)
    return 0 if all(verdict["held"] for verdict in result["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
