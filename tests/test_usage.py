"""Usage and cost through the running gateway (SPEC §12): money budgets exact across three replicas
on one Redis, the next period admitting by itself, `/admin/usage` equal on every replica and to the
access log's `cost_usd`; what a left, cut or failed-over request is charged; the report's rules."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.config import Config, ModelConfig, Price, RedisConfig
from proxy.periods import PeriodClock, period_at
from proxy.state import STATE

from .conftest import KEY, Gateway, Upstream, completion_body, completion_handler, make_config, sse_chunk
from .redisproc import RedisProcess

pytestmark = pytest.mark.timeout(60)

ADMIN = {"Authorization": "Bearer adm-key"}
AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
# USD per million tokens: 1000 in, 100 cached in, 1250 cache writes, 2000 out (large, so a few
# tokens make a visible cost). The upstream reports 5 prompt and 2 completion tokens: 9 m$.
PRICE = Price(input=10**9, output=2 * 10**9, cached_input=10**8, cache_write=1_250_000_000)
REQUEST_NANO = 5 * 1_000_000 + 2 * 2_000_000


def priced(config: Config, *, budget_usd: float | None = None, period: str = "total", redis: str = "") -> Config:
    models = {name: dataclasses.replace(m, price=PRICE) for name, m in config.models.items()}
    nano = None if budget_usd is None else round(budget_usd * 10**9)
    keys = (dataclasses.replace(config.keys[0], budget_nano_usd=nano, budget_period=period), *config.keys[1:])
    server = dataclasses.replace(config.server, admin_key="adm-key")
    return dataclasses.replace(
        config, models=models, keys=keys, server=server, redis=RedisConfig(url=redis, timeout_ms=500)
    )


async def post(http: Any, gateway: Gateway, body: dict[str, Any] = GOOD) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers=AUTH) as response:
        return response.status, orjson.loads(await response.read())


async def usage(http: Any, gateway: Gateway, period: str = "current") -> dict[str, Any]:
    async with http.get(f"{gateway.url}/admin/usage", params={"period": period}, headers=ADMIN) as response:
        assert response.status == 200, await response.text()
        return dict(orjson.loads(await response.read()))


def key_row(report: dict[str, Any], name: str = "team-a") -> dict[str, Any]:
    return dict(next(key for key in report["keys"] if key["key"] == name))


async def flush(*gateways: Gateway) -> None:
    """Every replica's settled usage is in the store."""
    for gateway in gateways:
        await getattr(gateway.server.app[STATE].gateway.limiter, "flush")()


class LogFile:
    """An access log written to a file, read back line by line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.log = AccessLog(fd=self.fd)

    def lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        return [json.loads(line) for line in self.path.read_text().splitlines()]


StartGateway = Callable[..., Awaitable[Gateway]]


async def test_a_money_budget_is_exact_across_three_replicas_and_the_next_day_admits_again(
    http: Any, upstream: Upstream, start_gateway: StartGateway, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # 5 requests spend 45 m$ < 50 m$: the 6th is admitted and overshoots by its own 9 m$
    config = priced(make_config([upstream.url]), budget_usd=0.05, period="daily", redis=redis_server.url)
    clocks = [PeriodClock() for _ in range(3)]
    logs = [LogFile(tmp_path / f"access-{i}.log") for i in range(3)]
    replicas = [
        await start_gateway(config, access_log=log.log, period_clock=clock) for log, clock in zip(logs, clocks)
    ]
    today = period_at("daily", clocks[0].now())
    statuses = []
    for i in range(8):
        statuses.append((await post(http, replicas[i % 3]))[0])
        await flush(*replicas)
    assert statuses == [200] * 6 + [402] * 2
    status, body = await post(http, replicas[2])
    assert status == 402 and body["error"]["code"] == "budget_exhausted"
    assert body["error"]["message"] == "This API key has used up its money budget (budget_usd) for this day."

    for clock in clocks:  # midnight passes on every replica; nobody resets anything
        clock.shift_s = today.end - clock.now() + 1
    assert [(await post(http, replica))[0] for replica in replicas] == [200, 200, 200]
    await flush(*replicas)

    previous = [await usage(http, replica, "previous") for replica in replicas]
    current = [await usage(http, replica) for replica in replicas]
    assert previous[0] == previous[1] == previous[2] and current[0] == current[1] == current[2]
    spent = key_row(previous[0])
    assert spent["period"] == {"id": today.id, "start": today.id[4:] + "T00:00:00Z", "end": spent["period"]["end"]}
    assert (spent["requests"], spent["prompt_tokens"], spent["completion_tokens"]) == (6, 30, 12)
    assert spent["cost_usd"] == 0.054 and spent["budget_usd"] == {"limit": 0.05, "used": 0.054, "left": 0.0}
    assert spent["models"]["gpt-test"]["requests"] == 6
    assert key_row(current[0])["requests"] == 3
    assert key_row(current[0])["budget_usd"] == {"limit": 0.05, "used": 0.027, "left": 0.023}

    lines = [line for log in logs for line in log.lines()]
    served = [line for line in lines if line["status"] == 200]
    assert len(served) == 9 and all(line["cost_usd"] == REQUEST_NANO / 10**9 for line in served)
    assert all(line["cost_usd"] is None for line in lines if line["status"] == 402)
    logged = sum(Decimal(repr(line["cost_usd"])) for line in served)
    reported = Decimal(repr(spent["cost_usd"])) + Decimal(repr(key_row(current[0])["cost_usd"]))
    assert logged == reported == Decimal("0.081")


async def test_a_token_budget_resets_with_its_period_too(
    http: Any, upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = priced(make_config([upstream.url]), period="monthly")
    config = dataclasses.replace(config, keys=(dataclasses.replace(config.keys[0], budget_tokens=14), *config.keys[1:]))
    clock = PeriodClock()
    gateway = await start_gateway(config, period_clock=clock)
    assert [(await post(http, gateway))[0] for _ in range(3)] == [200, 200, 402]
    status, body = await post(http, gateway)
    assert body["error"]["message"] == "This API key has used up its token budget for this month."
    clock.shift_s = period_at("monthly", clock.now()).end - clock.now()  # the first instant of next month
    assert (await post(http, gateway))[0] == 200
    row = key_row(await usage(http, gateway))
    assert row["budget_tokens"] == {"limit": 14, "used": 7, "left": 7}
    assert key_row(await usage(http, gateway, "previous"))["budget_tokens"] == {"limit": 14, "used": 14, "left": 0}


async def test_cache_reads_and_writes_are_priced_apart_in_the_log_and_the_report(
    http: Any, upstream: Upstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    body = completion_body(usage=(10, 2))
    body["usage"]["prompt_tokens_details"] = {"cached_tokens": 6, "cache_write_tokens": 3}
    upstream.handler = completion_handler(body=orjson.dumps(body))
    log = LogFile(tmp_path / "access.log")
    gateway = await start_gateway(priced(make_config([upstream.url])), access_log=log.log)
    assert (await post(http, gateway))[0] == 200
    expected = 1 * 1_000_000 + 6 * 100_000 + 3 * 1_250_000 + 2 * 2_000_000  # 9.35 m$
    assert log.lines()[0]["cost_usd"] == expected / 10**9
    row = key_row(await usage(http, gateway))["models"]["gpt-test"]
    assert row == {
        "requests": 1, "prompt_tokens": 10, "cached_tokens": 6, "cache_write_tokens": 3,
        "completion_tokens": 2, "cost_usd": expected / 10**9, "unpriced_requests": 0,
    }


def reservation_nano(body: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt estimate, completion cap, cost) of the reservation for `body` as aiohttp sends it."""
    prompt = len(json.dumps(body).encode()) // 4
    return prompt, body["max_tokens"], prompt * 1_000_000 + body["max_tokens"] * 2_000_000


async def test_a_cut_stream_is_charged_its_reservation_never_nothing(
    http: Any, upstream: Upstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_chunk("partial", usage=None))
        assert request.transport is not None
        request.transport.close()  # no usage chunk, no [DONE]
        return response

    upstream.handler = cut
    log = LogFile(tmp_path / "access.log")
    gateway = await start_gateway(priced(make_config([upstream.url])), access_log=log.log)
    stream = {**GOOD, "stream": True}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=stream, headers=AUTH) as response:
        assert b'"error"' in await response.read()
    prompt, completion, nano = reservation_nano(stream)
    row = key_row(await usage(http, gateway))
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (prompt, completion, nano / 10**9)
    assert log.lines()[0]["cost_usd"] == nano / 10**9


async def test_a_stream_the_client_left_is_charged_its_reservation(
    http: Any, upstream: Upstream, start_gateway: StartGateway
) -> None:
    client_gone = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_chunk("first", usage=None))
        await client_gone.wait()
        for _ in range(50):  # the gateway finds the client gone when it writes on
            await response.write(sse_chunk("more", usage=None))
            await asyncio.sleep(0)
        return response

    upstream.handler = slow
    gateway = await start_gateway(priced(make_config([upstream.url])))
    stream = {**GOOD, "stream": True}
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=stream, headers=AUTH)
    assert (await response.content.readline()).startswith(b"data: ")
    response.close()
    client_gone.set()
    prompt, completion, nano = reservation_nano(stream)
    async with asyncio.timeout(10):
        while key_row(await usage(http, gateway))["requests"] == 0:
            await asyncio.sleep(0.02)
    row = key_row(await usage(http, gateway))
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]) == (prompt, completion, nano / 10**9)


async def test_a_failed_over_request_is_charged_once_what_the_serving_upstream_reported(
    http: Any, make_upstream: Callable[[], Awaitable[Upstream]], start_gateway: StartGateway
) -> None:
    failing, serving = await make_upstream(), await make_upstream()
    failing.handler = completion_handler(status=500, body=b'{"error": {"message": "boom"}}')
    config = priced(make_config([failing.url, serving.url]), budget_usd=1000)
    config = dataclasses.replace(config, keys=(dataclasses.replace(config.keys[0], budget_tokens=10**6), *config.keys[1:]))
    # the failing account first (a lower priority tier), so every request fails over
    later = config.providers["up1"]
    later = dataclasses.replace(later, accounts=(dataclasses.replace(later.accounts[0], priority=1),))
    config = dataclasses.replace(config, providers=MappingProxyType({**config.providers, "up1": later}))
    gateway = await start_gateway(config)
    for _ in range(4):
        assert (await post(http, gateway))[0] == 200
    assert len(failing.requests) == 4 and len(serving.requests) == 4  # every request reached both
    row = key_row(await usage(http, gateway))
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (4, 20, 8)
    assert row["budget_tokens"]["used"] == 28 and row["budget_usd"]["used"] == 4 * REQUEST_NANO / 10**9


async def test_a_failed_over_answer_without_usage_is_charged_its_reservation(
    http: Any, make_upstream: Callable[[], Awaitable[Upstream]], start_gateway: StartGateway
) -> None:
    failing, serving = await make_upstream(), await make_upstream()
    failing.handler = completion_handler(status=503)
    body = completion_body()
    del body["usage"]
    serving.handler = completion_handler(body=orjson.dumps(body))
    gateway = await start_gateway(priced(make_config([failing.url, serving.url])))
    assert (await post(http, gateway))[0] == 200
    prompt, completion, nano = reservation_nano(GOOD)
    row = key_row(await usage(http, gateway))
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (1, prompt, completion)
    assert row["cost_usd"] == nano / 10**9


async def test_a_request_every_attempt_of_which_failed_costs_nothing(
    http: Any, upstream: Upstream, start_gateway: StartGateway
) -> None:
    upstream.handler = completion_handler(status=500)
    gateway = await start_gateway(priced(make_config([upstream.url])))
    assert (await post(http, gateway))[0] == 502
    row = key_row(await usage(http, gateway))
    assert (row["requests"], row["cost_usd"], row["prompt_tokens"]) == (1, 0.0, 0)


async def test_an_unpriced_model_counts_its_requests_and_no_cost(
    http: Any, upstream: Upstream, start_gateway: StartGateway, tmp_path: Path
) -> None:
    config = priced(make_config([upstream.url]))
    models = dict(config.models)
    models["gpt-test"] = dataclasses.replace(models["gpt-test"], price=None)
    log = LogFile(tmp_path / "access.log")
    gateway = await start_gateway(dataclasses.replace(config, models=models), access_log=log.log)
    assert (await post(http, gateway))[0] == 200
    row = key_row(await usage(http, gateway))["models"]["gpt-test"]
    assert (row["requests"], row["unpriced_requests"], row["cost_usd"], row["prompt_tokens"]) == (1, 1, 0.0, 5)
    assert log.lines()[0]["cost_usd"] is None


async def test_a_fallback_is_priced_at_its_own_price(
    http: Any, upstream: Upstream, start_gateway: StartGateway
) -> None:
    config = priced(make_config([upstream.url]))
    models = dict(config.models)
    # gpt-test has no target left to serve it; its fallback, at half the price, does
    models["gpt-test"] = dataclasses.replace(models["gpt-test"], targets=(), fallbacks=("cheap",))
    models["cheap"] = ModelConfig(name="cheap", targets=config.models["gpt-test"].targets,
                                  price=dataclasses.replace(PRICE, input=PRICE.input // 2, output=PRICE.output // 2))
    gateway = await start_gateway(dataclasses.replace(config, models=models))
    assert (await post(http, gateway))[0] == 200
    row = key_row(await usage(http, gateway))
    assert row["models"]["gpt-test"]["cost_usd"] == REQUEST_NANO / 2 / 10**9


async def test_the_report_needs_the_admin_key_and_a_known_period(
    http: Any, upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(priced(make_config([upstream.url]), budget_usd=2))
    async with http.get(f"{gateway.url}/admin/usage", params={"period": "last"}, headers=ADMIN) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert (error["code"], error["param"]) == ("invalid_value", "period")
    async with http.get(f"{gateway.url}/admin/usage", headers=AUTH) as response:
        assert response.status == 401
    report = await usage(http, gateway, "previous")
    assert report["period"] == "previous"
    row = key_row(report)
    assert row["period"] is None and row["requests"] == 0  # a total budget has no previous period
    assert row["budget_usd"] == {"limit": 2.0, "used": 0.0, "left": 2.0} and row["budget_tokens"] is None
    assert [key["key"] for key in report["keys"]] == ["team-a", "team-b"]
    unrestricted = key_row(await usage(http, gateway), "team-b")
    assert unrestricted["period"] == {"id": "total", "start": None, "end": None}
    assert unrestricted["budget_usd"] is None and unrestricted["models"] == {}
    no_admin = await start_gateway(make_config([upstream.url]))
    async with http.get(f"{no_admin.url}/admin/usage", headers=ADMIN) as response:
        assert response.status == 404
