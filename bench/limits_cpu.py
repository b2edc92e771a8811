"""CPU per admission + settlement: LocalLimiter vs RedisLimiter, 50 concurrent tasks, one run.

Starts its own redis-server on a free loopback port (stopped by PID at the end) and measures this
process's CPU time (`time.process_time()`) only; Redis's own CPU is another process.

    .venv/bin/python bench/limits_cpu.py [--requests N] [--concurrency C] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.config import Limits, RedisConfig  # noqa: E402
from proxy.periods import TOTAL  # noqa: E402
from proxy.ratelimit import Ask, Budget, Grant, Limiter, LocalLimiter, buckets_for  # noqa: E402
from proxy.redislimits import RedisLimiter  # noqa: E402
from proxy.usage import Charge  # noqa: E402

BIG = 10**9  # limits nobody reaches: every admission is a full take and settle


def start_redis() -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return process, port
        except OSError:
            time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    raise SystemExit("redis-server did not start")


def make_ask() -> Ask:
    """A typical request: the key's rpm, tpm and concurrency, and the model's rpm and tpm."""
    key = buckets_for("key", "bench", Limits(rpm=BIG, tpm=BIG, concurrency=BIG))
    model = buckets_for("model", "gpt-bench", Limits(rpm=BIG, tpm=BIG))
    return Ask([*key, *model], tokens=800, budget=Budget("bench", TOTAL.id, tokens=BIG, nano_usd=BIG))


async def drive(limiter: Limiter | None, requests: int, concurrency: int) -> float:
    """CPU seconds for `requests` admissions + settlements over `concurrency` tasks."""
    ask = make_ask()

    async def worker(count: int) -> None:
        for _ in range(count):
            outcome = await limiter.admit(ask) if limiter is not None else None
            await asyncio.sleep(0)  # the request's own work happens here
            if isinstance(outcome, Grant) and limiter is not None:
                limiter.settle(outcome, 300)
                limiter.record(Charge("bench", TOTAL, "gpt-bench", 200, 0, 0, 100, 300, 1250))

    per_task = requests // concurrency
    started = time.process_time()
    await asyncio.gather(*(worker(per_task) for _ in range(concurrency)))
    if limiter is not None:
        await getattr(limiter, "flush")()
    return time.process_time() - started


async def measure(
    make: Callable[[], Awaitable[Limiter | None]], requests: int, concurrency: int
) -> float:
    limiter = await make()
    try:
        await drive(limiter, requests // 10, concurrency)  # warm-up: connections, caches
        return await drive(limiter, requests, concurrency) / requests * 1e6
    finally:
        if limiter is not None:
            await limiter.close()


async def main(requests: int, concurrency: int) -> None:
    process, port = start_redis()
    try:
        redis_limiter: list[RedisLimiter] = []

        async def make_local() -> Limiter:
            return LocalLimiter()

        async def make_redis() -> Limiter:
            config = RedisConfig(url=f"redis://127.0.0.1:{port}/0", timeout_ms=100)
            limiter = RedisLimiter(config=config)
            await limiter.start()
            redis_limiter.append(limiter)
            return limiter

        async def make_none() -> None:
            return None

        harness = await measure(make_none, requests, concurrency)
        local = await measure(make_local, requests, concurrency)
        shared = await measure(make_redis, requests, concurrency)
        calls = redis_limiter[0].script_calls
        serial = requests // 10
        lone = await measure(make_redis, serial, 1) - await measure(make_none, serial, 1)
        loop = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
        print(f"{requests} requests, {concurrency} concurrent tasks, {loop}, 5 buckets + budget")
        print(f"harness alone (no limiter):   {harness:8.2f} us/request")
        print(f"LocalLimiter  admit+settle:   {local - harness:8.2f} us/request")
        print(f"RedisLimiter  admit+settle:   {shared - harness:8.2f} us/request")
        sent = requests + requests // 10  # warm-up included
        print(f"script calls: {calls} for {sent} requests ({sent / max(1, calls):.1f} per call)")
        print(f"RedisLimiter, 1 task at a time (a call per request): {lone:8.2f} us/request")
        print(f"ratio Redis/Local: {(shared - harness) / max(1e-9, local - harness):.2f}x; "
              f"Redis adds {shared - local:.2f} us/request over in-process limits")
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--no-uvloop", action="store_true")
    options = parser.parse_args()
    if not options.no_uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(options.requests, options.concurrency))
