"""Gateway-wide background work: quarantined accounts are probed and brought back."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from .conftest import KEY, Upstream, completion_handler, make_config

AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def test_quarantined_account_returns_after_a_successful_probe(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    revoked = {"yes": True}
    ok = completion_handler()

    async def handle(request: web.Request) -> web.StreamResponse:
        if revoked["yes"]:
            return web.json_response({"error": {"message": "revoked"}}, status=401)
        if request.path.endswith("/models"):
            return web.json_response({"object": "list", "data": []})
        return await ok(request)

    upstream.handler = handle
    gateway = await start_gateway(make_config([upstream.url]), probe_interval_s=0.05)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=AUTH) as r:
        assert r.status == 503
    await asyncio.sleep(0.2)  # probes run and fail while the key is still revoked
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=AUTH) as r:
        assert r.status == 503, "still quarantined: no chat request may reach the upstream"
    chats = [q for q in upstream.requests if q["path"].endswith("/chat/completions")]
    probes = [q for q in upstream.requests if q["path"].endswith("/models")]
    assert len(chats) == 1 and probes
    assert probes[0]["headers"]["authorization"] == "Bearer sk-upstream-0"
    revoked["yes"] = False
    async with asyncio.timeout(3):
        while True:
            async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=AUTH) as r:
                if r.status == 200:
                    break
            await asyncio.sleep(0.05)


async def test_reload_keeps_the_retry_history_unless_the_budget_changed() -> None:
    import dataclasses

    from proxy.gateway import Gateway
    from proxy.ratelimit import LocalLimiter

    config = make_config()  # the mock provider: nothing to connect
    first = Gateway(config=config, limiter=LocalLimiter())
    same = Gateway(config=config, limiter=LocalLimiter(), previous=first)
    assert same.retry_budget is first.retry_budget
    changed = dataclasses.replace(config, routing=dataclasses.replace(config.routing, retry_budget=0.5))
    after = Gateway(config=changed, limiter=LocalLimiter(), previous=same)
    assert after.retry_budget is not first.retry_budget
    await after.close()
