"""Failover, breakers and scheduling (SPEC §4, §5) end to end, against real loopback upstreams.

Several accounts of one provider share one upstream server; the upstream tells them apart by
the `Authorization: Bearer sk-<account>` header it receives and answers per account. Every test
checks both what the client got and what each upstream account was sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.app import build_app
from proxy.config import (
    AccountConfig,
    BreakerConfig,
    Config,
    KeyConfig,
    LoggingConfig,
    ModelConfig,
    ProviderConfig,
    RoutingConfig,
    ServerConfig,
    StickyConfig,
    Target,
    Timeouts,
)

from .conftest import (
    KEY,
    Handler,
    Upstream,
    closed_port_url,
    completion_handler,
    hang,
    sse_chunk,
    sse_events,
    stream_handler,
)

ADMIN_KEY = "adm-resilience"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}
FAST = Timeouts(connect_s=1, first_byte_s=0.3, idle_s=0.5, total_s=5)
# Opens after three failures in a row; the failure-rate trigger is out of reach on purpose.
BREAKER = BreakerConfig(
    consecutive_failures=3, failure_rate=1.0, min_requests=10_000, open_s=30, max_open_s=60
)
# Never opens within a test.
PATIENT = BreakerConfig(consecutive_failures=100, failure_rate=1.0, min_requests=10_000)
# Opens after two failures and half-opens again within 0.36 s.
QUICK_BREAKER = BreakerConfig(
    consecutive_failures=2, failure_rate=1.0, min_requests=10_000, open_s=0.3, max_open_s=1.0
)
OK = completion_handler()
FAIL = completion_handler(500, b'{"error": {"message": "boom"}}')


def account(
    name: str, *, weight: float = 1.0, priority: int = 0, groups: frozenset[str] | None = None
) -> AccountConfig:
    return AccountConfig(
        name=name, api_key=f"sk-{name}", weight=weight, priority=priority, groups=groups
    )


def provider(
    name: str,
    url: str,
    *accounts: AccountConfig,
    breaker: BreakerConfig = BREAKER,
    timeouts: Timeouts = FAST,
) -> ProviderConfig:
    return ProviderConfig(
        name=name, type="openai", base_url=url, timeouts=timeouts, breaker=breaker, accounts=accounts
    )


def gateway_key(
    secret: str, *, name: str = "team-a", group: str = "default", models: frozenset[str] | None = None
) -> KeyConfig:
    digest = hashlib.sha256(secret.encode()).hexdigest()
    return KeyConfig(name=name, key_sha256=digest, group=group, models=models)


def build_config(
    *providers: ProviderConfig,
    models: Mapping[str, ModelConfig] | None = None,
    routing: RoutingConfig = RoutingConfig(),
    keys: tuple[KeyConfig, ...] = (gateway_key(KEY),),
) -> Config:
    """One model `m` served by every provider (upstream name `up-m`), unless `models` is given."""
    if models is None:
        targets = tuple(Target(provider=p.name, model="up-m") for p in providers)
        models = {"m": ModelConfig(name="m", targets=targets)}
    return Config(
        server=ServerConfig(admin_key=ADMIN_KEY),
        keys=keys,
        providers=MappingProxyType({p.name: p for p in providers}),
        models=MappingProxyType(dict(models)),
        routing=routing,
        logging=LoggingConfig(access_log=False),
    )


def by_account(handlers: dict[str, Handler], default: Handler = OK) -> Handler:
    """Answers with the handler of the calling account; `handlers` may change during a test."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await handlers.get(caller(request.headers), default)(request)

    return handle


def caller(headers: Mapping[str, str]) -> str:
    """The account name in `Bearer sk-<name>`; `headers` as received, or lower-cased by Upstream."""
    return headers.get("authorization", "").removeprefix("Bearer sk-")


def callers(upstream: Upstream) -> list[str]:
    """The account behind each request the upstream received, in order."""
    return [caller(request["headers"]) for request in upstream.requests]


def answer(status: int, body: bytes = b"{}", headers: dict[str, str] | None = None) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    return handle


async def post(
    http: Any,
    url: str,
    body: dict[str, Any] = CHAT,
    *,
    key: str = KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=sent) as response:
        received = {k.lower(): v for k, v in response.headers.items()}
        return response.status, received, await response.read()


async def statuses(http: Any, url: str, count: int, body: dict[str, Any] = CHAT, **kw: Any) -> list[int]:
    return [(await post(http, url, body, **kw))[0] for _ in range(count)]


async def admin_state(http: Any, url: str) -> dict[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with http.get(f"{url}/admin/state", headers=headers) as response:
        assert response.status == 200
        accounts = orjson.loads(await response.read())["accounts"]
    return {entry["account"]: entry for entry in accounts}


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(body)["error"]
    return error


def events_of(raw: bytes) -> list[bytes]:
    return [event for event in raw.split(b"\n\n") if event]


async def wait_until_available(http: Any, url: str, name: str, timeout_s: float = 3.0) -> None:
    """Until /admin/state says the account could serve now (e.g. its breaker turned half-open)."""
    async with asyncio.timeout(timeout_s):
        while not (await admin_state(http, url))[name]["available"]:
            await asyncio.sleep(0.02)


async def wait_for(predicate: Any, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_failing_account_is_routed_around_and_its_breaker_cuts_it_off(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    upstream.handler = by_account({"bad": FAIL})
    names = ("good-1", "bad", "good-2")
    gateway = await start_gateway(build_config(provider("p", upstream.url, *map(account, names))))

    assert await statuses(http, gateway.url, 60) == [200] * 60

    seen = Counter(callers(upstream))
    assert seen["bad"] == BREAKER.consecutive_failures, "no traffic once its breaker opened"
    assert seen["good-1"] + seen["good-2"] == 60
    state = await admin_state(http, gateway.url)
    assert state["bad"]["breaker"] == "open"
    assert state["bad"]["last_error"] == "upstream 500"
    assert (state["good-1"]["breaker"], state["good-2"]["breaker"]) == ("closed", "closed")
    assert state["good-1"]["provider_breaker"] == "closed"


async def test_concurrent_clients_see_nothing_of_the_failing_account(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    upstream.handler = by_account({"bad": FAIL})
    names = ("good-1", "bad", "good-2")
    gateway = await start_gateway(build_config(provider("p", upstream.url, *map(account, names))))

    for _ in range(6):
        waves = await asyncio.gather(*(post(http, gateway.url) for _ in range(10)))
        assert [status for status, _, _ in waves] == [200] * 10

    assert (await admin_state(http, gateway.url))["bad"]["breaker"] == "open"
    hits = callers(upstream).count("bad")
    assert hits >= BREAKER.consecutive_failures
    assert await statuses(http, gateway.url, 20) == [200] * 20
    assert callers(upstream).count("bad") == hits


async def test_one_failing_account_never_opens_its_providers_breaker(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    """Four accounts, one answering 500, the default breaker: its failures arrive fast and
    together, yet count against it alone, so the three healthy accounts serve every request."""
    upstream = await make_upstream()
    upstream.handler = by_account({"bad": FAIL})
    names = ("good-1", "good-2", "bad", "good-3")
    accounts = [account(name, priority=0 if name == "bad" else 1) for name in names]
    # 40 requests at once on a busy machine: deadlines far from what FAST allows (a late first
    # byte from a healthy account is not what this test is about)
    patient = Timeouts(connect_s=5, first_byte_s=15, idle_s=15, total_s=30)
    gateway = await start_gateway(
        build_config(provider("p", upstream.url, *accounts, breaker=BreakerConfig(), timeouts=patient))
    )
    for _ in range(5):
        waves = await asyncio.gather(*(post(http, gateway.url) for _ in range(40)))
        assert [status for status, _, _ in waves] == [200] * 40

    state = await admin_state(http, gateway.url)
    assert state["bad"]["breaker"] == "open"
    assert {entry["provider_breaker"] for entry in state.values()} == {"closed"}
    assert callers(upstream).count("bad") >= BreakerConfig().consecutive_failures


async def test_a_host_that_refuses_connections_opens_its_providers_breaker(
    http: Any, start_gateway: Any
) -> None:
    names = ("a", "b", "c")
    gateway = await start_gateway(build_config(provider("p", closed_port_url(), *map(account, names))))
    # three refused connections in a row, each from another account: the provider's breaker opens
    got, _, body = await post(http, gateway.url)
    assert (got, error_of(body)["code"]) == (502, "upstream_unreachable")
    state = await admin_state(http, gateway.url)
    assert {entry["provider_breaker"] for entry in state.values()} == {"open"}
    assert {entry["breaker"] for entry in state.values()} == {"closed"}
    got, _, body = await post(http, gateway.url)
    assert (got, error_of(body)["code"]) == (503, "circuit_open")


async def test_circuit_open_retry_after_names_when_the_breaker_half_opens(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    upstream.handler = FAIL
    gateway = await start_gateway(build_config(provider("p", upstream.url, account("only"))))
    assert await statuses(http, gateway.url, BREAKER.consecutive_failures) == [502] * 3

    got, headers, body = await post(http, gateway.url)

    assert (got, error_of(body)["code"]) == (503, "circuit_open")
    # open_s=30 with a jitter of U(0.8, 1.2)
    assert 24 <= int(headers["retry-after"]) <= 36
    assert 24_000 <= int(headers["retry-after-ms"]) <= 36_000
    assert len(upstream.requests) == 3


async def test_max_concurrency_caps_each_account_in_flight(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    release = asyncio.Event()
    in_flight: Counter[str] = Counter()
    peak: Counter[str] = Counter()

    async def held(request: web.Request) -> web.StreamResponse:
        name = caller(request.headers)
        in_flight[name] += 1
        peak[name] = max(peak[name], in_flight[name])
        try:
            await release.wait()
            return await OK(request)
        finally:
            in_flight[name] -= 1

    upstream.handler = held
    accounts = (
        AccountConfig(name="a", api_key="sk-a", max_concurrency=2),
        AccountConfig(name="b", api_key="sk-b", max_concurrency=3),
    )
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    clients = [asyncio.create_task(post(http, gateway.url)) for _ in range(7)]
    await wait_for(lambda: len(upstream.requests) == 5 and sum(c.done() for c in clients) == 2)
    release.set()
    answers = await asyncio.gather(*clients)

    assert sorted(status for status, _, _ in answers) == [200] * 5 + [503] * 2
    assert {error_of(body)["code"] for status, _, body in answers if status == 503} == {
        "no_account_available"
    }
    assert peak == {"a": 2, "b": 3}


@pytest.mark.parametrize(
    ("hint", "wait_s"),
    [
        ({"Retry-After": "2"}, None),
        ({"retry-after-ms": "400"}, 0.4),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "400ms"}, 0.4),
    ],
    ids=["retry-after", "retry-after-ms", "x-ratelimit-reset"],
)
async def test_429_cools_the_account_for_the_time_it_names(
    http: Any, make_upstream: Any, start_gateway: Any, hint: dict[str, str], wait_s: float | None
) -> None:
    upstream = await make_upstream()
    handlers = {"first": answer(429, b'{"error": {"code": "rate_limit_exceeded"}}', hint)}
    upstream.handler = by_account(handlers)
    accounts = (account("first", priority=0), account("second", priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    assert await statuses(http, gateway.url, 10) == [200] * 10

    assert callers(upstream) == ["first"] + ["second"] * 10
    state = await admin_state(http, gateway.url)
    assert state["first"]["cooldown_until"] > 0
    assert state["first"]["breaker"] == "closed", "an account fault is not a breaker failure"
    assert state["first"]["available"] is False
    assert state["second"]["cooldown_until"] is None
    if wait_s is None:
        return
    handlers["first"] = OK
    await asyncio.sleep(wait_s + 0.1)
    assert await statuses(http, gateway.url, 1) == [200]
    assert callers(upstream)[-1] == "first", "back in service once the cooldown is over"


async def test_while_the_only_account_cools_requests_get_503_without_calling_it(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    upstream.handler = answer(429, b'{"error": {"code": "rate_limit_exceeded"}}', {"Retry-After": "2"})
    gateway = await start_gateway(build_config(provider("p", upstream.url, account("only"))))

    got, headers, body = await post(http, gateway.url)
    assert (got, error_of(body)["code"], headers["retry-after"]) == (503, "no_account_available", "2")

    got, headers, body = await post(http, gateway.url)
    assert (got, error_of(body)["code"]) == (503, "no_account_available")
    assert headers["retry-after"] == "2", "Retry-After says when the cooldown ends"
    assert len(upstream.requests) == 1


async def test_account_faults_neither_open_nor_reset_the_breaker(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    answers = iter([FAIL, answer(429, b"{}", {"retry-after-ms": "0"})] * 10)

    async def alternate(request: web.Request) -> web.StreamResponse:
        return await next(answers)(request)

    upstream.handler = by_account({"primary": alternate})
    accounts = (account("primary", priority=0), account("backup", priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    assert await statuses(http, gateway.url, 10) == [200] * 10

    # failure, 429, failure, 429, failure: three failures "in a row", the 429s do not count
    assert callers(upstream).count("primary") == 2 * BREAKER.consecutive_failures - 1
    assert callers(upstream).count("backup") == 10
    assert (await admin_state(http, gateway.url))["primary"]["breaker"] == "open"


@pytest.mark.parametrize(
    ("status", "body", "benched", "reason"),
    [
        (401, b'{"error": {"message": "bad key"}}', "quarantined", "upstream 401"),
        (403, b'{"error": {"message": "forbidden"}}', "quarantined", "upstream 403"),
        (402, b'{"error": {"message": "pay up"}}', "disabled", "upstream 402 insufficient_quota"),
        (
            429,
            b'{"error": {"message": "quota", "type": "insufficient_quota",'
            b' "code": "insufficient_quota"}}',
            "disabled",
            "upstream 429 insufficient_quota",
        ),
    ],
)
async def test_account_faults_bench_the_account(
    http: Any,
    make_upstream: Any,
    start_gateway: Any,
    status: int,
    body: bytes,
    benched: str,
    reason: str,
) -> None:
    upstream = await make_upstream()
    upstream.handler = by_account({"first": answer(status, body)})
    accounts = (account("first", priority=0), account("second", priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    assert await statuses(http, gateway.url, 10) == [200] * 10

    assert callers(upstream) == ["first"] + ["second"] * 10
    state = (await admin_state(http, gateway.url))["first"]
    assert state[benched] == reason
    assert state["available"] is False
    assert state["breaker"] == "closed"
    assert state["cooldown_until"] is None


async def test_a_successful_background_probe_lifts_a_quarantine(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    key_works = False

    async def revoked_then_restored(request: web.Request) -> web.StreamResponse:
        if not key_works:
            return await answer(401, b'{"error": {"message": "bad key"}}')(request)
        if request.method == "GET":
            return await answer(200, b'{"object": "list", "data": []}')(request)
        return await OK(request)

    def probes() -> list[dict[str, Any]]:
        return [r for r in upstream.requests if r["path"] == "/v1/models"]

    upstream.handler = by_account({"first": revoked_then_restored})
    accounts = (account("first", priority=0), account("second", priority=1))
    config = build_config(provider("p", upstream.url, *accounts))
    gateway = await start_gateway(config, probe_interval_s=0.05)

    assert await statuses(http, gateway.url, 3) == [200] * 3
    await wait_for(lambda: len(probes()) >= 2)
    assert (await admin_state(http, gateway.url))["first"]["quarantined"] == "upstream 401"

    key_works = True
    await wait_until_available(http, gateway.url, "first")
    assert await statuses(http, gateway.url, 2) == [200] * 2

    chats = [caller(r["headers"]) for r in upstream.requests if r["path"] == "/v1/chat/completions"]
    assert chats == ["first", "second", "second", "second", "first", "first"]
    probed = {caller(r["headers"]) for r in probes()}
    assert probed == {"first"}, "only the quarantined account is probed"


async def test_refused_and_hanging_accounts_fall_through_to_a_healthy_one(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    stuck, healthy = await make_upstream(), await make_upstream()
    stuck.handler = hang()
    providers = (
        provider("refused", closed_port_url(), account("r", priority=0)),
        provider("stuck", stuck.url, account("s", priority=1)),
        provider("healthy", healthy.url, account("h", priority=2)),
    )
    gateway = await start_gateway(build_config(*providers))

    got, _, body = await post(http, gateway.url)

    assert got == 200, body
    assert orjson.loads(body)["choices"][0]["message"]["content"] == "Hello there"
    assert (callers(stuck), callers(healthy)) == (["s"], ["h"])
    await wait_for(lambda: stuck.cancelled == 1)
    state = await admin_state(http, gateway.url)
    assert [state[name]["last_error"] is not None for name in ("r", "s", "h")] == [True, True, False]


@pytest.mark.parametrize("strategy", ["weighted_random", "least_busy"])
async def test_weights_split_sequential_traffic(
    http: Any, make_upstream: Any, start_gateway: Any, strategy: str
) -> None:
    upstream = await make_upstream()
    accounts = (account("heavy", weight=3), account("light", weight=1))
    routing = RoutingConfig(strategy=strategy)
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts), routing=routing))

    total = 800
    assert await statuses(http, gateway.url, total) == [200] * total

    seen = Counter(callers(upstream))
    assert seen["heavy"] + seen["light"] == total
    # ~4 standard deviations of an 800-draw binomial at p=0.75: a false alarm is ~1 in 10^4.
    assert abs(seen["heavy"] / total - 0.75) < 0.06, seen


async def test_round_robin_follows_the_weights_exactly(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    accounts = (account("heavy", weight=3), account("light", weight=1))
    routing = RoutingConfig(strategy="round_robin")
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts), routing=routing))

    assert await statuses(http, gateway.url, 40) == [200] * 40

    seen = callers(upstream)
    assert Counter(seen) == {"heavy": 30, "light": 10}
    assert all(Counter(seen[i : i + 4]) == {"heavy": 3, "light": 1} for i in range(0, 40, 4))


async def test_lower_priority_serves_only_while_the_higher_one_fails(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    handlers: dict[str, Handler] = {}
    upstream.handler = by_account(handlers)
    accounts = (account("primary", priority=0), account("backup", priority=1))
    config = build_config(provider("p", upstream.url, *accounts, breaker=QUICK_BREAKER))
    gateway = await start_gateway(config)

    assert await statuses(http, gateway.url, 20) == [200] * 20
    assert callers(upstream) == ["primary"] * 20

    handlers["primary"] = FAIL
    assert await statuses(http, gateway.url, 10) == [200] * 10
    failing = callers(upstream)[20:]
    assert failing[:4] == ["primary", "backup"] * 2, "failover until the primary's breaker opens"
    assert failing.count("backup") == 10
    assert all(failing[i + 1] == "backup" for i, name in enumerate(failing) if name == "primary")

    handlers["primary"] = OK
    await wait_until_available(http, gateway.url, "primary")
    assert await statuses(http, gateway.url, 5) == [200] * 5
    assert callers(upstream)[20 + len(failing) :] == ["primary"] * 5, "back to the better tier"


async def test_open_breaker_answers_503_without_calling_upstream_then_a_probe_closes_it(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    upstream.handler = FAIL
    config = build_config(provider("p", upstream.url, account("only"), breaker=QUICK_BREAKER))
    gateway = await start_gateway(config)
    assert await statuses(http, gateway.url, 2) == [502, 502]
    assert len(upstream.requests) == 2

    got, headers, body = await post(http, gateway.url)

    assert got == 503
    assert error_of(body) == {
        "message": "Provider circuit breaker open",
        "type": "service_unavailable",
        "param": None,
        "code": "circuit_open",
    }
    assert int(headers["retry-after"]) >= 1
    assert len(upstream.requests) == 2, "nothing reaches an upstream behind an open breaker"
    assert (await admin_state(http, gateway.url))["only"]["breaker"] == "open"

    upstream.handler = OK
    await asyncio.sleep(QUICK_BREAKER.open_s * 1.2 + 0.1)
    assert (await admin_state(http, gateway.url))["only"]["breaker"] == "half_open"
    assert await statuses(http, gateway.url, 3) == [200, 200, 200]
    assert len(upstream.requests) == 5
    state = (await admin_state(http, gateway.url))["only"]
    assert (state["breaker"], state["provider_breaker"]) == ("closed", "closed")


async def probe_with_a_client_that_leaves(http: Any, url: str, upstream: Upstream) -> None:
    sent = len(upstream.requests)
    client = asyncio.create_task(post(http, url))
    await wait_for(lambda: len(upstream.requests) > sent)
    client.cancel()
    with pytest.raises(asyncio.CancelledError):
        await client


@pytest.mark.parametrize("probe", ["fails", "hangs", "client-leaves"])
async def test_a_half_open_probe_that_does_not_succeed_reopens_the_breaker(
    http: Any, upstream: Upstream, start_gateway: Any, probe: str
) -> None:
    upstream.handler = FAIL
    config = build_config(provider("p", upstream.url, account("only"), breaker=QUICK_BREAKER))
    gateway = await start_gateway(config)
    assert await statuses(http, gateway.url, 2) == [502, 502]

    await asyncio.sleep(QUICK_BREAKER.open_s * 1.2 + 0.1)
    if probe == "fails":
        got, _, body = await post(http, gateway.url)
        assert (got, error_of(body)["code"]) == (502, "bad_upstream_response")
    elif probe == "hangs":
        upstream.handler = hang()
        got, _, body = await post(http, gateway.url)
        assert (got, error_of(body)["code"]) == (504, "upstream_timeout")
    else:
        upstream.handler = hang()
        await probe_with_a_client_that_leaves(http, gateway.url, upstream)
    assert len(upstream.requests) == 3, "one probe passed"
    await wait_for(lambda: upstream.cancelled == int(probe != "fails"))

    state = await admin_state(http, gateway.url)
    assert (state["only"]["breaker"], state["only"]["inflight"]) == ("open", 0)
    got, _, body = await post(http, gateway.url)
    assert (got, error_of(body)["code"]) == (503, "circuit_open")
    assert len(upstream.requests) == 3


async def test_provider_breaker_counts_overloaded_answers_across_its_accounts(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    flaky, healthy = await make_upstream(), await make_upstream()
    flaky.handler = answer(529, b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}')
    names = ("a1", "a2", "a3")
    providers = (
        provider("flaky", flaky.url, *(account(name, priority=0) for name in names)),
        provider("healthy", healthy.url, account("h", priority=1)),
    )
    routing = RoutingConfig(max_attempts=4)
    gateway = await start_gateway(build_config(*providers, routing=routing))

    assert await statuses(http, gateway.url, 5) == [200] * 5

    assert sorted(callers(flaky)) == ["a1", "a2", "a3"], "one failure each, then the provider opened"
    assert callers(healthy) == ["h"] * 5
    state = await admin_state(http, gateway.url)
    assert {state[name]["breaker"] for name in names} == {"closed"}
    assert {state[name]["provider_breaker"] for name in names} == {"open"}
    assert (state["h"]["breaker"], state["h"]["provider_breaker"]) == ("closed", "closed")


@pytest.mark.parametrize("secret", [KEY, "sk-only-model-a"], ids=["any-model-key", "allowlist-a-key"])
async def test_fallback_model_serves_when_the_primary_fails(
    http: Any, make_upstream: Any, start_gateway: Any, secret: str
) -> None:
    first, second = await make_upstream(), await make_upstream()
    first.handler = FAIL
    models = {
        "a": ModelConfig(name="a", targets=(Target(provider="pa", model="a-up"),), fallbacks=("b",)),
        "b": ModelConfig(name="b", targets=(Target(provider="pb", model="b-up"),)),
    }
    keys = (gateway_key(KEY), gateway_key("sk-only-model-a", name="only-a", models=frozenset({"a"})))
    providers = (provider("pa", first.url, account("a1")), provider("pb", second.url, account("b1")))
    gateway = await start_gateway(build_config(*providers, models=models, keys=keys))
    body = {**CHAT, "model": "a"}

    assert await statuses(http, gateway.url, 8, body, key=secret) == [200] * 8

    assert callers(first) == ["a1"] * BREAKER.consecutive_failures, "breaker open: straight to b"
    assert callers(second) == ["b1"] * 8
    assert {orjson.loads(r["body"])["model"] for r in first.requests} == {"a-up"}
    assert {orjson.loads(r["body"])["model"] for r in second.requests} == {"b-up"}
    if secret != KEY:
        got, _, answer_body = await post(http, gateway.url, {**CHAT, "model": "b"}, key=secret)
        assert (got, error_of(answer_body)["code"]) == (403, "model_not_allowed")


async def test_fallback_never_retries_an_account_the_request_already_tried(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    upstream.handler = FAIL
    models = {
        "a": ModelConfig(name="a", targets=(Target(provider="p", model="a-up"),), fallbacks=("b",)),
        "b": ModelConfig(name="b", targets=(Target(provider="p", model="b-up"),)),
    }
    config = build_config(provider("p", upstream.url, account("shared")), models=models)
    gateway = await start_gateway(config)

    got, _, body = await post(http, gateway.url, {**CHAT, "model": "a"})

    assert (got, error_of(body)["code"]) == (502, "bad_upstream_response")
    assert callers(upstream) == ["shared"]
    assert orjson.loads(upstream.requests[0]["body"])["model"] == "a-up"


async def test_caller_faults_neither_retry_nor_open_a_breaker(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    caller_fault = b'{"error": {"message": "bad temperature", "param": "temperature"}}'
    handlers = {"primary": answer(400, caller_fault)}
    upstream.handler = by_account(handlers)
    accounts = (account("primary", priority=0), account("backup", priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    for _ in range(12):
        got, _, body = await post(http, gateway.url)
        assert (got, body) == (400, caller_fault)
    assert callers(upstream) == ["primary"] * 12

    handlers["primary"] = OK
    assert await statuses(http, gateway.url, 3) == [200] * 3
    assert callers(upstream)[12:] == ["primary"] * 3
    state = (await admin_state(http, gateway.url))["primary"]
    assert (state["breaker"], state["provider_breaker"]) == ("closed", "closed")
    assert state["last_error"] is None


async def test_stream_failing_before_its_first_event_fails_over(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    upstream.handler = by_account({"primary": FAIL}, default=stream_handler(sse_events(["one", "two"])))
    accounts = (account("primary", priority=0), account("backup", priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    got, headers, body = await post(http, gateway.url, STREAM)

    assert (got, headers["content-type"]) == (200, "text/event-stream")
    events = events_of(body)
    assert events[-1] == b"data: [DONE]"
    deltas = [orjson.loads(event[6:])["choices"][0]["delta"] for event in events[:2]]
    assert [delta["content"] for delta in deltas] == ["one", "two"]
    assert callers(upstream) == ["primary", "backup"]


def cut_after_first_event(how: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_chunk("partial", usage=None))
        if how == "aborted":
            assert request.transport is not None
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    return handle


@pytest.mark.parametrize("how", ["ended", "aborted"])
async def test_stream_cut_after_its_first_event_is_not_retried(
    http: Any, make_upstream: Any, start_gateway: Any, how: str
) -> None:
    upstream = await make_upstream()
    upstream.handler = by_account({"primary": cut_after_first_event(how)})
    accounts = (account("primary", priority=0), account("backup", priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    got, _, body = await post(http, gateway.url, STREAM)

    assert got == 200
    events = events_of(body)
    assert len(events) == 2
    assert orjson.loads(events[0][6:])["choices"][0]["delta"]["content"] == "partial"
    assert error_of(events[1][6:])["code"] == "bad_upstream_response"
    assert b"data: [DONE]" not in body
    assert callers(upstream) == ["primary"], "no retry once the client has bytes"


def first_event_on_release(release: asyncio.Event) -> Handler:
    """Sends the stream's headers at once and its events only once `release` is set."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await release.wait()
        for event in sse_events(["late"]):
            await response.write(event)
        await response.write_eof()
        return response

    return handle


async def read_line(fd: int) -> bytes:
    line = b""
    async with asyncio.timeout(3):
        while not line.endswith(b"\n"):
            try:
                line += os.read(fd, 65536)
            except BlockingIOError:
                await asyncio.sleep(0.01)
    return line


async def test_client_leaving_before_the_first_event_is_499_not_an_internal_error(
    make_upstream: Any,
) -> None:
    upstream = await make_upstream()
    release = asyncio.Event()
    upstream.handler = first_event_on_release(release)
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    access_log = AccessLog(fd=write_fd, interval_s=0)
    app = build_app(build_config(provider("p", upstream.url, account("only"))), access_log=access_log)
    # aiohttp's default runner: a client that leaves does not cancel its handler.
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        body = orjson.dumps(STREAM)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        _, writer = await asyncio.open_connection(host, port)
        writer.write(head.encode() + body)
        await wait_for(lambda: len(upstream.requests) == 1)
        writer.close()
        await writer.wait_closed()
        assert runner.server is not None
        await wait_for(lambda: all(c.transport is None for c in runner.server.connections))
        release.set()

        record = orjson.loads(await read_line(read_fd))
    finally:
        await runner.cleanup()
        os.close(read_fd)
        os.close(write_fd)

    assert record["status"] == 499
    assert record["error_type"] != "internal_error"


async def test_max_attempts_caps_upstream_requests(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    upstream.handler = FAIL
    names = ("a1", "a2", "a3", "a4")
    accounts = map(account, names)
    config = build_config(
        provider("p", upstream.url, *accounts, breaker=PATIENT), routing=RoutingConfig(max_attempts=2)
    )
    gateway = await start_gateway(config)

    got, _, body = await post(http, gateway.url)

    assert (got, error_of(body)["code"]) == (502, "bad_upstream_response")
    assert len(upstream.requests) == 2
    assert len(set(callers(upstream))) == 2


async def test_a_request_never_tries_the_same_account_twice(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    upstream = await make_upstream()
    upstream.handler = FAIL
    accounts = (account("a1"), account("a2"))
    config = build_config(
        provider("p", upstream.url, *accounts, breaker=PATIENT), routing=RoutingConfig(max_attempts=5)
    )
    gateway = await start_gateway(config)

    for request in range(3):
        got, _, body = await post(http, gateway.url)
        assert (got, error_of(body)["code"]) == (502, "bad_upstream_response")
        assert sorted(callers(upstream)[2 * request :]) == ["a1", "a2"]


@pytest.mark.parametrize(
    ("order", "status", "code", "retry_after"),
    [
        (("fails", "limited"), 503, "no_account_available", "2"),
        (("limited", "fails"), 502, "bad_upstream_response", None),
    ],
    ids=["account-fault-last", "transient-fault-last"],
)
async def test_when_every_attempt_fails_the_last_one_decides_the_answer(
    http: Any,
    make_upstream: Any,
    start_gateway: Any,
    order: tuple[str, str],
    status: int,
    code: str,
    retry_after: str | None,
) -> None:
    upstream = await make_upstream()
    limited = answer(429, b'{"error": {"code": "rate_limit_exceeded"}}', {"Retry-After": "2"})
    upstream.handler = by_account({"fails": FAIL, "limited": limited})
    accounts = (account(order[0], priority=0), account(order[1], priority=1))
    gateway = await start_gateway(build_config(provider("p", upstream.url, *accounts)))

    got, headers, body = await post(http, gateway.url)

    assert (got, error_of(body)["code"]) == (status, code)
    assert headers.get("retry-after") == retry_after
    assert callers(upstream) == list(order)


async def test_spent_retry_budget_ends_the_request_with_its_first_error(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    healthy = await make_upstream()
    providers = (
        provider("refused", closed_port_url(), account("r", priority=0), breaker=PATIENT),
        provider("healthy", healthy.url, account("h", priority=1)),
    )
    routing = RoutingConfig(retry_budget=0, retry_min_per_s=0.1)  # one retry per 10 s
    gateway = await start_gateway(build_config(*providers, routing=routing))

    assert await statuses(http, gateway.url, 1) == [200]
    assert callers(healthy) == ["h"]

    got, _, body = await post(http, gateway.url)

    assert (got, error_of(body)["code"]) == (502, "upstream_unreachable")
    assert callers(healthy) == ["h"], "the retry was refused"


@pytest.mark.parametrize(
    ("headers", "extra"),
    [({"x-session-id": "session-1"}, {}), ({}, {"user": "user-1"})],
    ids=["x-session-id", "user"],
)
async def test_sticky_session_holds_its_account_until_it_fails(
    http: Any, make_upstream: Any, start_gateway: Any, headers: dict[str, str], extra: dict[str, Any]
) -> None:
    upstream = await make_upstream()
    handlers: dict[str, Handler] = {}
    upstream.handler = by_account(handlers)
    routing = RoutingConfig(sticky=StickyConfig(enabled=True))
    names = ("a1", "a2", "a3")
    config = build_config(provider("p", upstream.url, *map(account, names)), routing=routing)
    gateway = await start_gateway(config)
    body = {**CHAT, **extra}

    assert await statuses(http, gateway.url, 30) == [200] * 30
    assert len(set(callers(upstream))) > 1, "without a session, traffic spreads"
    del upstream.requests[:]

    assert await statuses(http, gateway.url, 20, body, headers=headers) == [200] * 20
    held = callers(upstream)
    assert len(set(held)) == 1
    del upstream.requests[:]

    handlers[held[0]] = FAIL
    assert await statuses(http, gateway.url, 10, body, headers=headers) == [200] * 10

    moved = callers(upstream)
    assert moved[0] == held[0]
    assert len(set(moved[1:])) == 1 and moved[1] != held[0]
    assert len(moved) == 11


async def test_no_account_in_the_keys_group_is_503(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    keys = (gateway_key(KEY), gateway_key("sk-gold", name="gold", group="gold"))
    gold_only = account("g1", groups=frozenset({"gold"}))
    gateway = await start_gateway(build_config(provider("p", upstream.url, gold_only), keys=keys))

    got, headers, body = await post(http, gateway.url)

    assert got == 503
    assert error_of(body)["code"] == "no_account_available"
    assert int(headers["retry-after"]) >= 1
    assert upstream.requests == []
    assert await statuses(http, gateway.url, 1, key="sk-gold") == [200]
    assert callers(upstream) == ["g1"]
