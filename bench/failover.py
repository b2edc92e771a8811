"""Failover under load: what clients see, and what it costs upstream, when one account is flaky.

Starts on loopback one aiohttp upstream standing in for a provider with three accounts
(`steady-1`, `flaky`, `steady-2`, told apart by the `Authorization` key they send), where
`flaky` answers 500 to every second request it gets (strictly alternating, so runs repeat)
and the others always answer 200; then the gateway in-process (`build_app` on an
`aiohttp.web.AppRunner`, default routing: least_busy, max_attempts 3, default breakers).
It sends N chat requests, 20 at a time, half JSON and half streaming, and prints:

- client requests sent, and client failures (non-200, or a stream not ending with [DONE]);
- upstream attempts in total and per client request (the price of failover);
- each account's share of upstream attempts, and how many of them the upstream failed;
- each breaker's state at the end (from /admin/state).

With the default breaker (failure_rate 0.5 over at least 20 requests) the flaky account's
breaker opens after about 20 of its attempts and stays open for open_s=30 s (x U(0.8, 1.2)),
longer than a default run: its share mostly measures how quickly the breaker reacts, and the
attempts per request what failover cost until then.

A measurement, not a test: it asserts nothing. Everything it starts is stopped before it exits;
the whole run is bounded by --deadline-s.

    .venv/bin/python bench/failover.py [--requests N] [--concurrency C] [--deadline-s S]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.app import build_app
from proxy.config import (
    AccountConfig,
    Config,
    KeyConfig,
    LoggingConfig,
    ModelConfig,
    ProviderConfig,
    RoutingConfig,
    ServerConfig,
    Target,
)

GATEWAY_KEY = "sk-bench-client"
ADMIN_KEY = "adm-bench"
ACCOUNTS = ("steady-1", "flaky", "steady-2")
FLAKY = "flaky"
MODEL = "bench-model"
WORDS = ("failover", "is", "measured", "here")


@dataclass
class UpstreamLog:
    """What the upstream saw: attempts and failures it answered, per account."""

    attempts: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


def upstream_app(log: UpstreamLog) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        account = request.headers.get("Authorization", "").removeprefix("Bearer sk-")
        body = orjson.loads(await request.read())
        log.attempts[account] += 1
        if account == FLAKY and log.attempts[account] % 2 == 1:
            log.failed[account] += 1
            return web.json_response({"error": {"message": "flaky"}}, status=500)
        if body.get("stream"):
            return await _stream(request)
        return web.Response(body=orjson.dumps(_completion()), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    return app


def _completion() -> dict[str, Any]:
    message = {"role": "assistant", "content": " ".join(WORDS)}
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 5 + len(WORDS)},
    }


def _chunk(delta: dict[str, Any], finish: str | None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def _stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for word in WORDS:
        await response.write(_chunk({"content": word}, None))
    await response.write(_chunk({}, "stop"))
    usage = {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 5 + len(WORDS)}
    final = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "choices": [], "usage": usage}
    await response.write(b"data: " + orjson.dumps(final) + b"\n\n" + b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def gateway_config(upstream_url: str) -> Config:
    accounts = tuple(AccountConfig(name=name, api_key=f"sk-{name}") for name in ACCOUNTS)
    provider = ProviderConfig(name="up", type="openai", base_url=upstream_url, accounts=accounts)
    key = KeyConfig(name="bench", key_sha256=hashlib.sha256(GATEWAY_KEY.encode()).hexdigest())
    model = ModelConfig(name=MODEL, targets=(Target(provider="up", model=MODEL),))
    return Config(
        server=ServerConfig(host="127.0.0.1", port=0, admin_key=ADMIN_KEY),
        keys=(key,),
        providers=MappingProxyType({"up": provider}),
        models=MappingProxyType({MODEL: model}),
        routing=RoutingConfig(),
        logging=LoggingConfig(level="error", access_log=False),
    )


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    # As `llm-proxy serve` runs it: a client that leaves cancels its handler.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def one_request(session: aiohttp.ClientSession, url: str, stream: bool) -> bool:
    """Whether the client got what it asked for: a 200, and for a stream, one ending in [DONE]."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
            payload = await response.read()
    except aiohttp.ClientError:
        return False
    if response.status != 200:
        return False
    if stream:
        return payload.rstrip().endswith(b"data: [DONE]")
    return bool(orjson.loads(payload).get("choices"))


async def drive(url: str, requests: int, concurrency: int) -> int:
    """Sends `requests` requests from `concurrency` workers, even ones streaming; the failures."""
    failures = 0
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            nonlocal failures, next_index
            while next_index < requests:
                index, next_index = next_index, next_index + 1
                if not await one_request(session, url, stream=index % 2 == 1):
                    failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def breaker_states(url: str) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/admin/state", headers=headers) as response:
            accounts: list[dict[str, Any]] = orjson.loads(await response.read())["accounts"]
    return accounts


def report(
    requests: int, failures: int, log: UpstreamLog, states: list[dict[str, Any]], elapsed_s: float
) -> None:
    attempts = sum(log.attempts.values())
    print(f"client requests sent:          {requests} (half JSON, half streaming)")
    print(f"client failures:               {failures}")
    print(f"upstream attempts total:       {attempts}")
    print(f"attempts per client request:   {attempts / requests:.4f}")
    print("traffic share per account (upstream attempts; of them answered 500):")
    for name in ACCOUNTS:
        share = log.attempts[name] / attempts if attempts else 0.0
        counts = f"{log.attempts[name]:>6} attempts, {log.failed[name]:>5} failed"
        print(f"  {name:<10} {share:7.2%}  {counts}")
    print("at the end (account breaker / provider breaker, in flight):")
    for entry in states:
        breakers = f"{entry['breaker']} / {entry['provider_breaker']}"
        print(f"  {entry['account']:<10} {breakers:<18} {entry['inflight']}")
    print(f"wall time:                     {elapsed_s:.2f}s ({requests / elapsed_s:.0f} requests/s)")


async def run(requests: int, concurrency: int) -> None:
    log = UpstreamLog()
    upstream_runner, upstream_url = await start(upstream_app(log))
    try:
        gateway_runner, gateway_url = await start(build_app(gateway_config(f"{upstream_url}/v1")))
        try:
            began = time.perf_counter()
            failures = await drive(gateway_url, requests, concurrency)
            elapsed_s = time.perf_counter() - began
            states = await breaker_states(gateway_url)
        finally:
            await gateway_runner.cleanup()
    finally:
        await upstream_runner.cleanup()
    report(requests, failures, log, states, elapsed_s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="client requests (default 2000)")
    parser.add_argument("--concurrency", type=int, default=20, help="requests in flight (default 20)")
    parser.add_argument("--deadline-s", type=float, default=120.0, help="bound on the whole run")
    args = parser.parse_args()
    if args.requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be >= 1")
    # Each failed attempt logs a warning; the upstream's own counts below say the same, once.
    logging.basicConfig(level=logging.ERROR)

    async def bounded() -> None:
        async with asyncio.timeout(args.deadline_s):
            await run(args.requests, args.concurrency)

    try:
        asyncio.run(bounded())
    except TimeoutError:
        print(f"stopped: the run exceeded --deadline-s={args.deadline_s:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
