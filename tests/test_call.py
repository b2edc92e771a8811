"""`Call`: usage figures from upstreams are untrusted input; an absurd one never reaches the limits."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.call import Call
from proxy.config import KeyConfig, Limits, RedisConfig
from proxy.limitscript import HASH_TAG
from proxy.ratelimit import MAX_TOKENS

from .conftest import KEY, Upstream, completion_body, completion_handler, make_config
from .redisproc import RedisProcess, redis_server  # noqa: F401  (fixture: a real redis-server)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 5, "completion_tokens": 2}, (5, 2)),
        ({"prompt_tokens": 0, "completion_tokens": MAX_TOKENS}, (0, MAX_TOKENS)),
        ({"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 2}, (None, 2)),
        ({"prompt_tokens": 1 << 64, "completion_tokens": 1 << 70}, (None, None)),
        ({"prompt_tokens": -1, "completion_tokens": 2.0}, (None, None)),
        ({"prompt_tokens": True, "completion_tokens": "3"}, (None, None)),
        ({"prompt_tokens": None}, (None, None)),
        ([1, 2], (None, None)),
    ],
)
def test_record_usage_keeps_only_plausible_token_counts(usage: Any, expected: tuple[Any, Any]) -> None:
    call = Call(gateway=None, request_id="req_1", started=0.0)  # type: ignore[arg-type]
    call.record_usage(usage)
    assert (call.prompt_tokens, call.completion_tokens) == expected


async def test_an_upstream_reporting_absurd_usage_breaks_no_shared_limit(
    start_gateway: Any, upstream: Upstream, http: Any, redis_server: RedisProcess  # noqa: F811
) -> None:
    body = completion_body()
    body["usage"] = {"prompt_tokens": (1 << 64) - 1, "completion_tokens": 1 << 63, "total_tokens": 1}
    upstream.handler = completion_handler(body=orjson.dumps(body))
    config = make_config([upstream.url])
    key = KeyConfig(
        name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest(),
        limits=Limits(rpm=1000, tpm=10_000_000), budget_tokens=1 << 50,
    )
    config = dataclasses.replace(
        config, keys=(key,), redis=RedisConfig(url=redis_server.url, timeout_ms=500, on_error="fail_closed")
    )
    gateway = await start_gateway(config)
    request = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    for _ in range(5):
        async with http.post(f"{gateway.url}/v1/chat/completions", json=request, headers=headers) as response:
            assert response.status == 200, await response.text()
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        # each request charged its reservation (the absurd figures were ignored), all in Redis
        used = int(await raw.hget(f"{HASH_TAG}:usage:total:team-a", "t") or 0)
    finally:
        await raw.aclose()
    assert 0 < used < 5 * 2000
