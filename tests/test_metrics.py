"""`/metrics` after real traffic: the SPEC §7 series, their labels, and nothing secret."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from .conftest import KEY, Upstream, completion_handler, make_config, sse_events, stream_handler

AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


async def scrape(http: Any, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert KEY not in text and "sk-upstream" not in text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_requests_tokens_attempts_and_retries_are_counted(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.handler = completion_handler(500, b"{}")
    good.handler = completion_handler()
    config = make_config([bad.url, good.url])
    bad_provider = config.providers["up0"]  # tried first: the bad account is certain to be attempted
    bad_account = dataclasses.replace(bad_provider.accounts[0], priority=0)
    good_provider = config.providers["up1"]
    good_account = dataclasses.replace(good_provider.accounts[0], priority=1)
    providers = {
        "up0": dataclasses.replace(bad_provider, accounts=(bad_account,)),
        "up1": dataclasses.replace(good_provider, accounts=(good_account,)),
    }
    config = dataclasses.replace(config, providers=providers)
    gateway = await start_gateway(config, registry=CollectorRegistry())
    for _ in range(4):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=AUTH) as r:
            assert r.status == 200
    async with http.post(f"{gateway.url}/v1/chat/completions", json={**GOOD, "model": "nope"}, headers=AUTH) as r:
        assert r.status == 404
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD) as r:
        assert r.status == 401
    samples = await scrape(http, gateway.url)
    ok = {"model": "gpt-test", "key": "team-a", "status": "200", "error_type": ""}
    assert value(samples, "llm_proxy_requests_total", api="chat", **ok) == 4
    assert value(samples, "llm_proxy_requests_total", api="chat", model="unknown", key="team-a", status="404", error_type="model_not_found") == 1
    assert value(samples, "llm_proxy_requests_total", api="chat", model="unknown", key="unknown", status="401", error_type="invalid_api_key") == 1
    assert value(samples, "llm_proxy_tokens_total", api="chat", model="gpt-test", key="team-a", type="prompt") == 20
    assert value(samples, "llm_proxy_tokens_total", api="chat", model="gpt-test", key="team-a", type="completion") == 8
    bad_attempts = value(samples, "llm_proxy_upstream_requests_total", provider="up0", account="acct0", outcome="bad_response")
    assert bad_attempts >= 1
    assert value(samples, "llm_proxy_upstream_requests_total", provider="up1", account="acct1", outcome="success") == 4
    assert value(samples, "llm_proxy_retries_total", provider="up0", reason="bad_response") == bad_attempts
    assert value(samples, "llm_proxy_overhead_seconds_count") == 6
    assert value(samples, "llm_proxy_request_duration_seconds_count", api="chat", model="gpt-test", stream="false") == 4
    assert value(samples, "llm_proxy_time_to_first_token_seconds_count", api="chat", model="gpt-test", provider="up1") == 4
    assert value(samples, "llm_proxy_account_available", provider="up1", account="acct1") == 1
    assert value(samples, "llm_proxy_breaker_state", provider="up1", account="*") == 0
    assert value(samples, "llm_proxy_inflight_requests", provider="up0", account="acct0") == 0
    assert ("llm_proxy_redis_degraded", ()) in samples


async def test_stream_tokens_and_ttft(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = stream_handler(sse_events(["a", "b"], usage=(6, 2)))
    gateway = await start_gateway(make_config([upstream.url]), registry=CollectorRegistry())
    async with http.post(f"{gateway.url}/v1/chat/completions", json={**GOOD, "stream": True}, headers=AUTH) as r:
        assert r.status == 200
        await r.read()
    samples = await scrape(http, gateway.url)
    assert value(samples, "llm_proxy_tokens_total", api="chat", model="gpt-test", key="team-a", type="completion") == 2
    assert value(samples, "llm_proxy_request_duration_seconds_count", api="chat", model="gpt-test", stream="true") == 1
    assert value(samples, "llm_proxy_time_to_first_token_seconds_count", api="chat", model="gpt-test", provider="up0") == 1


async def test_metrics_can_be_switched_off(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    import dataclasses

    config = make_config([upstream.url])
    config = dataclasses.replace(config, logging=dataclasses.replace(config.logging, metrics=False))
    gateway = await start_gateway(config)
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=AUTH) as r:
        assert r.status == 200
    async with http.get(f"{gateway.url}/metrics") as r:
        assert r.status == 404
