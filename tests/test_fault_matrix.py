"""The upstream-fault matrix end to end: every way an upstream misbehaves, JSON and streamed, many
requests at once, some clients leaving midway, the limits shared through a real Redis.

The invariant: each request ends in exactly one complete answer or one explicit error, with
`x-request-id`; afterwards nothing is in flight, no upstream connection is held and no
concurrency lease is left in Redis. Chat completions and, converted, the Messages API.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from types import MappingProxyType
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from bench.faultupstream import MODES, WORDS, FaultUpstream
from proxy.config import (
    AccountConfig,
    BreakerConfig,
    Config,
    KeyConfig,
    Limits,
    LoggingConfig,
    ModelConfig,
    ProviderConfig,
    RedisConfig,
    RoutingConfig,
    ServerConfig,
    Target,
    Timeouts,
)
from proxy.limitscript import HASH_TAG
from proxy.state import STATE

from .conftest import KEY
from .redisproc import RedisProcess, redis_server  # noqa: F401  (fixture: a real redis-server)

pytestmark = pytest.mark.timeout(60)

ADMIN_KEY = "adm-matrix"
# Hundreds of requests start at once on one loop (client, gateway and upstream share it): on a
# busy machine a well-behaved answer may wait a good fraction of a second for its turn, which
# must not read as a timeout.
TIMEOUTS = Timeouts(connect_s=2, first_byte_s=2.5, idle_s=2.5, total_s=20)
NEVER_OPENS = BreakerConfig(consecutive_failures=100_000, failure_rate=1.0, min_requests=100_000)
CONCURRENCY = 10_000
PER_CASE = 6  # concurrent requests per (mode, JSON or stream)
ABORTING = 3  # and this many more per mode whose client leaves midway

# What the client gets from a model served by one account of each mode: (status, error code or
# None) for a JSON request, and for a stream: the status, then how the stream ends ("done": the
# words and [DONE]; an error code: that one error event and nothing after it). A stream broken
# after its first event may also be seen broken before the gateway read that event (a busy
# machine reads both at once): then it fails before commit, as a 502.
ERROR_502 = (502, "bad_upstream_response")
EXPECTED: dict[str, tuple[tuple[int, str | None], tuple[int, str | None]]] = {
    "ok": ((200, None), (200, "done")),
    "slow": ((200, None), (200, "done")),
    "reset": (ERROR_502, ERROR_502),
    "rst": (ERROR_502, ERROR_502),
    "garbage": (ERROR_502, ERROR_502),
    "cut_head": (ERROR_502, ERROR_502),
    "cut_body": (ERROR_502, (200, "bad_upstream_response")),
    "not_object": (ERROR_502, (200, "bad_upstream_response")),
    "bad_chunk": (ERROR_502, (200, "bad_upstream_response")),
    "hang": ((504, "upstream_timeout"), (504, "upstream_timeout")),
    "stall": ((504, "upstream_timeout"), (200, "upstream_timeout")),
    "s400": ((400, None), (400, None)),
    "s401": ((503, "no_account_available"), (503, "no_account_available")),
    "s429": ((503, "no_account_available"), (503, "no_account_available")),
    "s500": (ERROR_502, ERROR_502),
    "s529": (ERROR_502, ERROR_502),
}


def test_every_mode_of_the_fault_upstream_has_an_expectation() -> None:
    assert set(EXPECTED) == set(MODES)


def matrix_config(upstream_url: str, redis_url: str) -> Config:
    """One provider and model per mode (`m-<mode>`), and `m-any` served by all of them."""
    providers = {
        f"p-{mode}": ProviderConfig(
            name=f"p-{mode}", type="openai", base_url=upstream_url, timeouts=TIMEOUTS,
            breaker=NEVER_OPENS, accounts=(AccountConfig(name=mode, api_key=f"sk-{mode}"),),
        )
        for mode in MODES
    }
    models = {
        f"m-{mode}": ModelConfig(name=f"m-{mode}", targets=(Target(f"p-{mode}", "up"),)) for mode in MODES
    }
    models["m-any"] = ModelConfig(name="m-any", targets=tuple(Target(name, "up") for name in providers))
    key = KeyConfig(
        name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest(),
        limits=Limits(concurrency=CONCURRENCY),
    )
    return Config(
        server=ServerConfig(admin_key=ADMIN_KEY),
        redis=RedisConfig(url=redis_url, timeout_ms=500),
        keys=(key,),
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        routing=RoutingConfig(max_attempts=3, retry_budget=1.0, retry_min_per_s=1000),
        logging=LoggingConfig(access_log=False),
    )


@pytest.fixture
async def fault_upstream() -> AsyncIterator[FaultUpstream]:
    server = FaultUpstream()
    await server.start()
    yield server
    await server.close()


async def send(http: aiohttp.ClientSession, url: str, model: str, stream: bool) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


Send = Callable[[aiohttp.ClientSession, str, str, bool], Awaitable[tuple[int, dict[str, str], bytes]]]


async def send_and_leave(
    http: aiohttp.ClientSession, url: str, model: str, stream: bool, after_s: float, send: Send = send
) -> None:
    try:
        async with asyncio.timeout(after_s):
            await send(http, url, model, stream)
    except TimeoutError:
        pass


def stream_ending(body: bytes) -> str:
    """`done`, or the code of the one terminal error event; fails on anything else."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events, "an empty stream"
    for e in events[:-1]:
        assert e.startswith(b"data: {") and b'"error"' not in e, e
    last = events[-1]
    if last == b"data: [DONE]":
        words = "".join(orjson.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]
                        if orjson.loads(e[6:])["choices"])
        assert words.split() == list(WORDS)
        return "done"
    return error_code(last.removeprefix(b"data: "))


def error_code(body: bytes) -> str:
    error = orjson.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    code: str = error["code"]
    return code


def check(mode: str, stream: bool, status: int, headers: dict[str, str], body: bytes) -> None:
    expected_status, expected_end = EXPECTED[mode][stream]
    assert headers.get("x-request-id", "").startswith("req_"), (mode, stream, headers)
    if (status, expected_status, expected_end) == (502, 200, "bad_upstream_response"):
        expected_status = 502
    assert status == expected_status, (mode, stream, status, body[:300])
    if status == 200 and stream:
        assert stream_ending(body) == expected_end, (mode, body[-300:])
    elif status == 200:
        assert orjson.loads(body)["choices"][0]["message"]["content"] == " ".join(WORDS)
    elif expected_end is not None:
        assert error_code(body) == expected_end, (mode, stream, body)


async def wait_settled(app: Any, redis_url: str, within_s: float = 15.0) -> None:
    """Until nothing is in flight and every lease is back; then the pools hold no busy connection."""
    state = app[STATE]
    raw = aioredis.Redis.from_url(redis_url)
    lease_key = f"{HASH_TAG}:lease:key:team-a:concurrency"
    try:
        async with asyncio.timeout(within_s):
            while True:
                await state.gateway.limiter.flush()
                accounts = state.gateway.accounts.accounts
                if not state.inflight and all(a.inflight == 0 for a in accounts) and await raw.zcard(lease_key) == 0:
                    break
                await asyncio.sleep(0.05)
    finally:
        await raw.aclose()
    for name, provider in state.gateway.providers.items():
        pool = provider.transport.pool
        assert pool.connections == pool.idle, (name, pool.connections, pool.idle)


Check = Callable[[str, bool, int, dict[str, str], bytes], None]


async def every_mode_at_once(
    gateway: Any, redis_url: str, send: Send, check: Check, *, per_case: int, seed: int
) -> None:
    """`per_case` requests of each mode, JSON and streamed, all at once, and `ABORTING` more per
    mode whose client leaves midway; each answer `check`ed, then nothing left in flight."""
    rng = random.Random(seed)
    cases = [(mode, stream) for mode in MODES for stream in (False, True) for _ in range(per_case)]
    rng.shuffle(cases)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        leaving = [
            send_and_leave(http, gateway.url, f"m-{mode}", rng.random() < 0.5, rng.uniform(0.001, 0.3), send=send)
            for mode in MODES for _ in range(ABORTING)
        ]
        answers, *_ = await asyncio.gather(
            asyncio.gather(*(send(http, gateway.url, f"m-{mode}", stream) for mode, stream in cases)),
            *leaving,
        )
        for (mode, stream), (status, headers, body) in zip(cases, answers):
            check(mode, stream, status, headers, body)
        await wait_settled(gateway.server.app, redis_url)


async def test_every_fault_gets_its_one_answer_and_nothing_leaks(
    start_gateway: Any, fault_upstream: FaultUpstream, redis_server: RedisProcess  # noqa: F811
) -> None:
    gateway = await start_gateway(matrix_config(fault_upstream.url, redis_server.url))
    await every_mode_at_once(gateway, redis_server.url, send, check, per_case=PER_CASE, seed=7)
    assert fault_upstream.open <= len(MODES) * PER_CASE * 2  # only idle keep-alives remain


async def test_a_model_over_every_fault_fails_over_or_answers_one_explicit_error(
    start_gateway: Any, fault_upstream: FaultUpstream, redis_server: RedisProcess  # noqa: F811
) -> None:
    gateway = await start_gateway(matrix_config(fault_upstream.url, redis_server.url))
    rng = random.Random(11)
    streams = [rng.random() < 0.5 for _ in range(150)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        answers = await asyncio.gather(*(send(http, gateway.url, "m-any", stream) for stream in streams))
        for stream, (status, headers, body) in zip(streams, answers):
            assert headers.get("x-request-id", "").startswith("req_")
            if status == 200 and stream:
                stream_ending(body)  # the words and [DONE], or exactly one terminal error event
            elif status == 200:
                assert orjson.loads(body)["choices"][0]["message"]["content"] == " ".join(WORDS)
            elif status != 400:  # 400: the caller-fault account's answer, relayed as it came
                assert status in (502, 503, 504), (status, body)
                error_code(body)
        await wait_settled(gateway.server.app, redis_server.url)
    assert sum(status == 200 for status, _, _ in answers) > 0


# The same matrix through /v1/messages: each request converted to the OpenAI-format fault
# upstream and back, its answer or error in Anthropic's shapes (SPEC §10's status table).
ANTHROPIC_STATUS = {502: 500, 503: 529}
ANTHROPIC_TYPE = {
    "bad_upstream_response": "api_error", "upstream_timeout": "timeout_error",
    "no_account_available": "overloaded_error",
}


async def send_messages(http: aiohttp.ClientSession, url: str, model: str, stream: bool) -> tuple[int, dict[str, str], bytes]:
    body = {"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(f"{url}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def messages_ending(body: bytes) -> str:
    """`done` (the words, then message_stop), or the type of the one terminal error event."""
    events = [e for e in body.split(b"\n\n") if e.strip()]
    assert events and all(e.startswith(b"event: ") for e in events), body[:300]
    for e in events[:-1]:
        assert not e.startswith(b"event: error"), e
    name, _, data = events[-1].partition(b"\ndata: ")
    payload = orjson.loads(data)
    if name == b"event: message_stop":
        words = "".join(orjson.loads(e.partition(b"\ndata: ")[2])["delta"].get("text", "")
                        for e in events if e.startswith(b"event: content_block_delta"))
        assert words.split() == list(WORDS)
        return "done"
    assert name == b"event: error" and payload["type"] == "error", events[-1]
    kind: str = payload["error"]["type"]
    return kind


def check_messages(mode: str, stream: bool, status: int, headers: dict[str, str], body: bytes) -> None:
    chat_status, chat_end = EXPECTED[mode][stream]
    expected_status = ANTHROPIC_STATUS.get(chat_status, chat_status)
    expected_end = ANTHROPIC_TYPE.get(chat_end or "", chat_end)
    assert headers.get("x-request-id", "").startswith("req_"), (mode, stream, headers)
    if expected_status == 200 and stream and expected_end != "done" and status != 200:
        # a converted stream commits at its first content: a stream broken or stalled before
        # its first word fails before commit, with the status its error stands for
        expected_status = {"api_error": 500, "timeout_error": 504}[str(expected_end)]
    assert status == expected_status, (mode, stream, status, body[:300])
    if status == 200 and stream:
        assert messages_ending(body) == expected_end, (mode, body[-300:])
    elif status == 200:
        assert orjson.loads(body)["content"][0]["text"] == " ".join(WORDS)
    else:
        error = orjson.loads(body)
        assert error["type"] == "error" and set(error["error"]) >= {"type", "message"}, error
        if expected_end is not None:
            assert error["error"]["type"] == expected_end, (mode, stream, body)


async def test_every_fault_over_the_messages_api_gets_its_one_answer_and_nothing_leaks(
    start_gateway: Any, fault_upstream: FaultUpstream, redis_server: RedisProcess  # noqa: F811
) -> None:
    gateway = await start_gateway(matrix_config(fault_upstream.url, redis_server.url))
    await every_mode_at_once(gateway, redis_server.url, send_messages, check_messages, per_case=PER_CASE // 2, seed=13)
