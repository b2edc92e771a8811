"""The `anthropic` provider type end to end: the official `openai` SDK through the running gateway
to a fake that speaks Anthropic's Messages API (tests/fakeanthropic.py), and back.

Checks what the upstream received (path, headers, the converted body) and what the client got:
answers, tool calls, usage with cache tokens, streams, errors relayed or failed over, cooling.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import openai
import orjson
import pytest

from proxy.caps import Caps
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
    Target,
    Timeouts,
)

from .conftest import KEY, Upstream, completion_handler, make_config
from .fakeanthropic import API_KEY, ErrorReply, FakeAnthropic, Reply, text, thinking, tool_use, usage

ADMIN_KEY = "adm-anthropic"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
PATIENT = BreakerConfig(consecutive_failures=1000, min_requests=1000)
TIMEOUTS = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=20)


def claude(name: str, url: str, *accounts: str, beta: tuple[str, ...] = ()) -> ProviderConfig:
    return ProviderConfig(
        name=name, type="anthropic", base_url=url.removesuffix("/v1"), timeouts=TIMEOUTS, breaker=PATIENT,
        accounts=tuple(AccountConfig(name=a, api_key=API_KEY if a.startswith("ok") else f"sk-ant-{a}") for a in accounts),
        anthropic_beta=beta,
    )


def config(*providers: ProviderConfig, models: dict[str, ModelConfig] | None = None) -> Config:
    models = models or {
        "claude": ModelConfig(
            name="claude", targets=tuple(Target(p.name, "claude-up-1") for p in providers),
            default_max_tokens=512, caps=Caps(max_output_tokens=4096),
        ),
    }
    return Config(
        server=ServerConfig(admin_key=ADMIN_KEY),
        keys=(KeyConfig(name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest()),),
        providers=MappingProxyType({p.name: p for p in providers}),
        models=MappingProxyType(models),
        routing=RoutingConfig(max_attempts=3),
        logging=LoggingConfig(access_log=False),
    )


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeAnthropic, str]:
    anthropic = FakeAnthropic()
    server = await aiohttp_server(anthropic.app())
    return anthropic, str(server.make_url(""))


async def test_a_json_answer_converted_both_ways(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    anthropic, url = fake
    anthropic.script(Reply(content=[text("Hello"), text(" world")], usage=usage(10, 4, cache_read=100, cache_write=20)))
    gateway = await start_gateway(config(claude("c", url, "ok-1", beta=("prompt-caching-2024-07-31",))))
    completion = await gateway.client().chat.completions.create(
        model="claude", messages=MESSAGES, temperature=0.5, seed=7, max_tokens=100,
    )
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (130, 4, 134)
    assert completion.usage.prompt_tokens_details is not None and completion.usage.prompt_tokens_details.cached_tokens == 100
    received = anthropic.requests[-1]
    assert received.path == "/v1/messages"
    assert received.headers["x-api-key"] == API_KEY and "authorization" not in received.headers
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert received.json == {  # built field by field: Anthropic has no seed, so it is dropped
        "model": "claude-up-1", "max_tokens": 100, "system": [{"type": "text", "text": "be brief"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "temperature": 0.5,
    }
    exposition = (await http.get(f"{gateway.url}/metrics")).content
    assert b'llm_proxy_conversion_dropped_params_total{param="seed",provider="c"} 1.0' in await exposition.read()


async def test_tool_calls_over_a_converted_stream(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    anthropic, url = fake
    anthropic.script(Reply(
        content=[thinking("let me see"), text("Checking."), tool_use("toolu_A", "weather", {"city": "Paris"}),
                 tool_use("toolu_B", "now", {})],
        stop_reason="tool_use", usage=usage(20, 41, cache_read=1000),
    ))
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("weather", "now")]
    stream = await gateway.client().chat.completions.create(
        model="claude", messages=MESSAGES, tools=tools, stream=True, stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    calls: dict[int, dict[str, str]] = {}
    content = ""
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index == 0
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += call.id or ""
                entry["name"] += (call.function.name or "") if call.function else ""
                entry["arguments"] += (call.function.arguments or "") if call.function else ""
    assert content == "Checking."
    assert [(c["id"], c["name"], orjson.loads(c["arguments"])) for c in calls.values()] == [
        ("toolu_A", "weather", {"city": "Paris"}), ("toolu_B", "now", {}),
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not chunks[-1].choices and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (1020, 41)
    assert anthropic.requests[-1].json["stream"] is True


async def test_no_usage_chunk_unless_asked(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    anthropic, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    body = {"model": "claude", "messages": MESSAGES, "stream": True}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        raw = await response.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert all(b'"usage"' not in e for e in events)
    assert "stream_options" not in anthropic.requests[-1].json


async def test_an_error_event_before_the_first_content_fails_over(
    start_gateway: Any, fake: tuple[FakeAnthropic, str]
) -> None:
    anthropic, url = fake
    anthropic.script(Reply(error_after=1), Reply(content=[text("from the second")]))  # after message_start
    gateway = await start_gateway(config(claude("c", url, "ok-1", "ok-2")))
    stream = await gateway.client().chat.completions.create(model="claude", messages=MESSAGES, stream=True)
    text_seen = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(text_seen) == "from the second"
    assert len(anthropic.requests) == 2


async def test_an_error_event_after_content_ends_the_stream_with_one_error(
    start_gateway: Any, fake: tuple[FakeAnthropic, str]
) -> None:
    anthropic, url = fake
    seen_content = asyncio.Event()
    anthropic.script(Reply(content=[text("partial answer here")], piece=4, error_after=5, hold=seen_content))
    gateway = await start_gateway(config(claude("c", url, "ok-1", "ok-2")))
    stream = await gateway.client().chat.completions.create(model="claude", messages=MESSAGES, stream=True)
    received = ""
    with pytest.raises(openai.APIError, match="overloaded_error"):
        async for chunk in stream:
            received += chunk.choices[0].delta.content or "" if chunk.choices else ""
            if received:
                seen_content.set()
    assert received.startswith("part") and len(anthropic.requests) == 1


async def test_a_cut_stream_is_an_error_not_a_success(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    anthropic, url = fake
    seen_content = asyncio.Event()
    anthropic.script(Reply(content=[text("partial answer here")], piece=4, cut_after=5, hold=seen_content))
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    body = {"model": "claude", "messages": MESSAGES, "stream": True}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == 200
        raw = b""
        async for piece in response.content.iter_any():
            raw += piece
            if b'"content":"part' in raw:
                seen_content.set()
    events = [e for e in raw.split(b"\n\n") if e]
    assert b"[DONE]" not in raw and b'"content":"part' in raw
    assert orjson.loads(events[-1].removeprefix(b"data: "))["error"]["code"] == "bad_upstream_response"


@pytest.mark.parametrize(
    ("reply", "status", "code"),
    [
        (ErrorReply(529, "overloaded_error", "Overloaded"), 502, "bad_upstream_response"),
        (ErrorReply(500, "api_error", "boom"), 502, "bad_upstream_response"),
        (ErrorReply(401, "authentication_error", "bad key"), 503, "no_account_available"),
        (ErrorReply(429, "rate_limit_error", "slow", headers={"retry-after": "7"}), 503, "no_account_available"),
        (ErrorReply(404, "not_found_error", "model: claude-up-1"), 502, "bad_upstream_response"),
    ],
    ids=["529", "500", "401", "429", "404"],
)
async def test_upstream_failures_end_in_the_gateways_errors(
    start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any, reply: ErrorReply, status: int, code: str
) -> None:
    anthropic, url = fake
    anthropic.default = reply
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    body = {"model": "claude", "messages": MESSAGES}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status == status
        assert (await response.json())["error"]["code"] == code


async def test_a_429_cools_the_account_for_its_retry_after_and_the_other_serves(
    start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any
) -> None:
    anthropic, url = fake
    anthropic.script(ErrorReply(429, "rate_limit_error", "slow down", headers={"retry-after": "30"}))
    gateway = await start_gateway(config(claude("c", url, "ok-1", "ok-2")))
    completion = await gateway.client().chat.completions.create(model="claude", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    async with http.get(f"{gateway.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        accounts = (await response.json())["accounts"]
    cooling = [a for a in accounts if a["cooldown_until"] is not None]
    assert len(cooling) == 1 and 25 <= cooling[0]["cooldown_until"] <= 30


async def test_a_caller_fault_is_relayed_openai_shaped_with_the_upstream_request_id(
    start_gateway: Any, fake: tuple[FakeAnthropic, str]
) -> None:
    anthropic, url = fake
    anthropic.default = ErrorReply(400, "invalid_request_error", "messages: text content blocks must be non-empty")
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="claude", messages=MESSAGES)
    assert "text content blocks must be non-empty" in caught.value.message
    assert caught.value.code == "invalid_request_error"
    assert caught.value.response.headers.get("x-upstream-request-id", "").startswith("req_")
    assert len(anthropic.requests) == 1  # no retry


async def test_what_anthropic_cannot_express_is_refused_before_any_attempt(
    start_gateway: Any, fake: tuple[FakeAnthropic, str]
) -> None:
    anthropic, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="claude", messages=MESSAGES, n=2)
    assert (caught.value.code, caught.value.param) == ("unsupported_field", "n")
    assert anthropic.requests == []


async def test_a_model_falls_back_from_openai_to_claude(
    start_gateway: Any, fake: tuple[FakeAnthropic, str], upstream: Upstream
) -> None:
    anthropic, url = fake
    upstream.handler = completion_handler(500, b'{"error": {"message": "down"}}')
    base = make_config([upstream.url])
    models = {
        "gpt": ModelConfig(name="gpt", targets=(Target("up0", "gpt-up"),), fallbacks=("claude",)),
        "claude": ModelConfig(name="claude", targets=(Target("c", "claude-up-1"),)),
    }
    providers = {**base.providers, "c": claude("c", url, "ok-1")}
    gateway = await start_gateway(config(*providers.values(), models=models))
    completion = await gateway.client().chat.completions.create(model="gpt", messages=MESSAGES)
    assert (completion.choices[0].message.content, completion.model) == ("Hello there", "claude-up-1")
    assert len(upstream.requests) == 1 and len(anthropic.requests) == 1


async def test_the_mock_imitating_anthropic_goes_through_the_same_conversion(start_gateway: Any) -> None:
    mock = ProviderConfig(name="m", type="mock", accounts=(AccountConfig(name="mock"),), imitate="anthropic")
    gateway = await start_gateway(config(mock))
    client = gateway.client()
    messages = [{"role": "user", "content": "one two three four"}]
    completion = await client.chat.completions.create(model="claude", messages=messages, max_tokens=3)
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == ("one two three", "length")
    stream = await client.chat.completions.create(
        model="claude", messages=messages, stream=True, stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "one two three four"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_a_429_with_only_anthropics_reset_headers_cools_until_the_exhausted_reset(
    start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any
) -> None:
    anthropic, url = fake
    reset = datetime.fromtimestamp(time.time() + 40, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    later = datetime.fromtimestamp(time.time() + 900, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    headers = {
        "anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-tokens-remaining": "5000", "anthropic-ratelimit-tokens-reset": later,
    }
    anthropic.script(ErrorReply(429, "rate_limit_error", "slow down", headers=headers))
    gateway = await start_gateway(config(claude("c", url, "ok-1", "ok-2")))
    completion = await gateway.client().chat.completions.create(model="claude", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    async with http.get(f"{gateway.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        accounts = (await response.json())["accounts"]
    cooling = [a for a in accounts if a["cooldown_until"] is not None]
    assert len(cooling) == 1 and 30 <= cooling[0]["cooldown_until"] <= 41  # the exhausted dimension's


async def test_a_spend_cap_429_benches_the_account_until_a_probe_succeeds(
    start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any
) -> None:
    anthropic, url = fake
    anthropic.script(ErrorReply(429, "rate_limit_error", "You have reached your spend cap."))
    gateway = await start_gateway(config(claude("c", url, "ok-1", "ok-2")))
    completion = await gateway.client().chat.completions.create(model="claude", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    async with http.get(f"{gateway.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        accounts = (await response.json())["accounts"]
    assert [a["quarantined"] for a in accounts if a["quarantined"]] == ["anthropic 429 spend cap"]
    assert all(a["cooldown_until"] is None for a in accounts)
