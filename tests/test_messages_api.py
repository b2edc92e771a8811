"""`POST /v1/messages` end to end with the official `anthropic` SDK as the client (SPEC §10).

Through the running gateway to (a) a fake speaking Anthropic's Messages API (tests/fakeanthropic.py,
checked against the SDK in test_anthropic_fake.py): the client's bytes pass through, and (b) a real
aiohttp upstream speaking OpenAI's Chat Completions: converted both ways. Checks what the upstream
received and what the client got: answers, streams with the SDK's helpers, tool use over several
turns, images, thinking, count_tokens, every error class, failover before and after commit, limits,
sticky sessions, the access log and metrics.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import os
from types import MappingProxyType
from typing import Any

import anthropic
import orjson
import pytest
from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.config import (
    AccountConfig,
    BreakerConfig,
    Config,
    GuardrailConfig,
    KeyConfig,
    Limits,
    LoggingConfig,
    ModelConfig,
    Price,
    ProviderConfig,
    RoutingConfig,
    ServerConfig,
    StickyConfig,
    Target,
    Timeouts,
)

from .conftest import KEY, OTHER_KEY, Upstream, completion_handler, stream_handler
from .fakeanthropic import API_KEY, ErrorReply, FakeAnthropic, Reply, sse, stream_events, text, thinking, tool_use, usage

PATIENT = BreakerConfig(consecutive_failures=1000, min_requests=1000)
TIMEOUTS = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=20)
HI = [{"role": "user", "content": "hi"}]


def claude(name: str, url: str, *accounts: str, beta: tuple[str, ...] = ()) -> ProviderConfig:
    return ProviderConfig(
        name=name, type="anthropic", base_url=url.rstrip("/"), timeouts=TIMEOUTS, breaker=PATIENT,
        accounts=tuple(AccountConfig(name=a, api_key=API_KEY if a.startswith("ok") else f"sk-ant-{a}") for a in accounts),
        anthropic_beta=beta,
    )


def openai_format(name: str, url: str, *accounts: str) -> ProviderConfig:
    return ProviderConfig(
        name=name, type="openai", base_url=url, timeouts=TIMEOUTS, breaker=PATIENT,
        accounts=tuple(AccountConfig(name=a, api_key=f"sk-openai-{a}") for a in accounts),
    )


def config(
    *providers: ProviderConfig, upstream_model: str = "claude-up-1", limits: Limits = Limits(),
    sticky: bool = False, max_body_bytes: int = 8 * 1024 * 1024, budget_tokens: int | None = None,
    max_attempts: int = 3,
) -> Config:
    models = {
        "claude-sonnet": ModelConfig(
            name="claude-sonnet", targets=tuple(Target(p.name, upstream_model) for p in providers),
            default_max_tokens=512,
        ),
        "other": ModelConfig(name="other", targets=tuple(Target(p.name, "o") for p in providers)),
    }
    keys = (
        KeyConfig(name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest(), limits=limits,
                  budget_tokens=budget_tokens),
        KeyConfig(name="team-b", key_sha256=hashlib.sha256(OTHER_KEY.encode()).hexdigest(), models=frozenset({"other"})),
    )
    return Config(
        server=ServerConfig(max_body_bytes=max_body_bytes),
        keys=keys,
        providers=MappingProxyType({p.name: p for p in providers}),
        models=MappingProxyType(models),
        routing=RoutingConfig(max_attempts=max_attempts, sticky=StickyConfig(enabled=sticky)),
        logging=LoggingConfig(access_log=False),
    )


_CLIENTS: list[anthropic.AsyncAnthropic] = []


def client(gateway: Any, key: str = KEY) -> anthropic.AsyncAnthropic:
    """An SDK client of `gateway`, closed when the test ends."""
    sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0, timeout=20)
    _CLIENTS.append(sdk)
    return sdk


@pytest.fixture(autouse=True)
async def _close_clients() -> Any:
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeAnthropic, str]:
    upstream = FakeAnthropic()
    server = await aiohttp_server(upstream.app())
    return upstream, str(server.make_url(""))


class Lines:
    """The access log's lines, read from a pipe."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        self.log = AccessLog(fd=write, interval_s=0)
        self._buffer = b""

    async def wait_for(self, count: int) -> list[dict[str, Any]]:
        """The first `count` lines, once written (settlement runs as the response ends)."""
        async with asyncio.timeout(10):
            while self._buffer.count(b"\n") < count:
                self.log.flush()
                try:
                    self._buffer += os.read(self._read, 1 << 16)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        return [orjson.loads(line) for line in self._buffer.splitlines()[:count]]


# (a) pass-through to an Anthropic account ------------------------------------------------------


async def test_json_passes_through_with_only_the_model_changed(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    upstream.script(Reply(content=[thinking("hmm"), text("Hello")], usage=usage(10, 4, cache_read=100, cache_write=20)))
    gateway = await start_gateway(config(claude("c", url, "ok-1", beta=("gateway-beta-1",))))
    # number formats and key order orjson would not keep, and a big integer
    sent = (b'{"max_tokens":100, "model":"claude-sonnet","messages":[{"role":"user","content":"hi"}],'
            b'"temperature":1.0E0,"metadata":{"user_id":"u-12345678901234567890123"},"top_k":12345678901234567890}')
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "client-beta-1, gateway-beta-1",
               "content-type": "application/json"}
    async with http.post(f"{gateway.url}/v1/messages", data=sent, headers=headers) as response:
        assert response.status == 200
        answer = await response.read()
        assert response.headers["x-request-id"].startswith("req_")
    received = upstream.requests[-1]
    assert received.path == "/v1/messages"
    # spliced: every value's bytes kept (members are joined compactly), only `model` new
    assert received.body == sent.replace(b'"claude-sonnet"', b'"claude-up-1"').replace(b', "model"', b',"model"')
    assert received.headers["x-api-key"] == API_KEY and "authorization" not in received.headers
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["anthropic-beta"] == "gateway-beta-1,client-beta-1"
    message = orjson.loads(answer)  # the upstream's answer, as it sent it
    assert message["content"][0] == {"type": "thinking", "thinking": "hmm", "signature": thinking("hmm")["signature"]}
    assert message["usage"]["cache_read_input_tokens"] == 100


async def test_the_sdk_async_and_sync(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1"), upstream_model="claude-sonnet"))
    message = await client(gateway).messages.create(model="claude-sonnet", max_tokens=50, messages=HI, system="be brief")
    assert message.content[0].type == "text" and message.content[0].text == "Hello there"
    assert message.model == "claude-sonnet" and message.stop_reason == "end_turn"
    assert upstream.requests[-1].json["system"] == "be brief"

    def sync_call() -> anthropic.types.Message:
        with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0, timeout=20) as sync:
            return sync.messages.create(model="claude-sonnet", max_tokens=50, messages=HI)

    assert (await asyncio.to_thread(sync_call)).content[0].text == "Hello there"  # type: ignore[union-attr]


async def test_a_stream_is_relayed_event_for_event(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    reply = Reply(content=[thinking("let me think"), text("Hello world, streamed"), tool_use("toolu_1", "now", {"tz": "UTC"})],
                  stop_reason="tool_use", usage=usage(30, 9, cache_read=7))
    upstream.script(reply, reply)
    lines = Lines()
    gateway = await start_gateway(config(claude("c", url, "ok-1")), access_log=lines.log)
    async with client(gateway).messages.stream(model="claude-sonnet", max_tokens=64, messages=HI) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "Hello world, streamed"
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].signature == thinking("x")["signature"]  # type: ignore[union-attr]
    assert final.content[2].input == {"tz": "UTC"}  # type: ignore[union-attr]
    assert final.usage.input_tokens == 30 and final.usage.output_tokens == 9
    # the bytes: exactly the upstream's events, none held back or rewritten
    body = {"model": "claude-sonnet", "max_tokens": 64, "messages": HI, "stream": True}
    async with http.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"}) as response:
        relayed = await response.read()
    expected = b"".join(sse(e) for e in stream_events(reply, {
        "id": "msg_fake0002", "type": "message", "role": "assistant", "model": "claude-up-1", "content": reply.content,
        "stop_reason": reply.stop_reason, "stop_sequence": None, "usage": reply.usage}))
    assert relayed == expected
    first, second = await lines.wait_for(2)
    for line in (first, second):  # settled on the upstream's figures: input + cache read, output
        assert (line["api"], line["stream"], line["status"]) == ("messages", True, 200)
        assert (line["prompt_tokens"], line["completion_tokens"]) == (37, 9)


async def test_claude_code_traffic_passes_through_byte_for_byte(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    fixture = claude_code_request()
    gateway = await start_gateway(config(claude("c", url, "ok-1"), upstream_model="claude-sonnet"))
    headers = claude_code_headers()
    async with http.post(f"{gateway.url}/v1/messages?beta=true", data=fixture, headers=headers) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        events = await response.read()
    assert b"event: message_stop" in events
    received = upstream.requests[-1]
    assert received.body == fixture  # the same name upstream: not one byte changed
    assert received.headers["anthropic-beta"] == headers["anthropic-beta"].replace(", ", ",")
    async with http.post(f"{gateway.url}/v1/messages/count_tokens?beta=true", data=count_request(fixture), headers=headers) as response:
        assert response.status == 200
        assert (await response.json())["input_tokens"] > 0
    assert upstream.requests[-1].path == "/v1/messages/count_tokens"
    assert upstream.requests[-1].body == count_request(fixture)


def claude_code_headers() -> dict[str, str]:
    return {
        "authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01", "content-type": "application/json",
        "anthropic-beta": "claude-code-20250219, interleaved-thinking-2025-05-14, fine-grained-tool-streaming-2025-05-14",
        "x-claude-code-session-id": "0b7c5a1e-session", "user-agent": "claude-cli/2.1.0 (external, cli)",
    }


def claude_code_request() -> bytes:
    """What Claude Code sends: a stream, max_tokens 32000, cache_control breakpoints on system,
    tools and the last message, thinking, metadata.user_id; in its own key order."""
    cache = {"type": "ephemeral"}
    body = {
        "model": "claude-sonnet",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"},
                                         {"type": "text", "text": "Fix the failing test", "cache_control": cache}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Look first.", "signature": "EqQBCgIYAhIM1gbcDa9G"},
                {"type": "tool_use", "id": "toolu_01A", "name": "Read", "input": {"file_path": "/src/a.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "x = 1\n",
                                          "cache_control": cache}]},
        ],
        "temperature": 1,
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": cache},
                   {"type": "text", "text": "Environment: linux", "cache_control": cache}],
        "tools": [{"name": "Read", "description": "Reads a file", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"],
            "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}, "cache_control": cache}],
        "metadata": {"user_id": "user_abc_account_def_session_0b7c5a1e"},
        "max_tokens": 32000,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "stream": True,
    }
    return orjson.dumps(body)


def count_request(body: bytes) -> bytes:
    data = orjson.loads(body)
    return orjson.dumps({k: data[k] for k in ("model", "messages", "system", "tools")})


async def test_an_overloaded_error_right_after_message_start_fails_over(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(Reply(error_after=2), Reply(content=[text("from the second account")]))  # after message_start, ping
    gateway = await start_gateway(config(claude("c", url, "ok-1"), claude("d", url, "ok-2")))
    async with client(gateway).messages.stream(model="claude-sonnet", max_tokens=64, messages=HI) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "from the second account"  # type: ignore[union-attr]
    assert len(upstream.requests) == 2


async def test_an_error_after_content_is_the_upstreams_error_event(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    hold = asyncio.Event()
    upstream.script(Reply(content=[text("partial answer here")], error_after=4, hold=hold))
    gateway = await start_gateway(config(claude("c", url, "ok-1"), claude("d", url, "ok-2")))
    body = {"model": "claude-sonnet", "max_tokens": 64, "messages": HI, "stream": True}
    async with http.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        first = await response.content.readuntil(b"\n\n")  # message_start, released at the first content
        assert first.startswith(b"event: message_start")
        hold.set()
        rest = await response.read()
    events = [e for e in rest.split(b"\n\n") if e]
    assert events[-1] == b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    assert b"message_stop" not in rest and sum(e.startswith(b"event: error") for e in events) == 1
    assert len(upstream.requests) == 1  # committed: no failover
    hold = asyncio.Event()
    upstream.script(Reply(content=[text("partial answer here")], error_after=4, hold=hold))
    seen = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with client(gateway).messages.stream(model="claude-sonnet", max_tokens=64, messages=HI) as stream:
            async for event in stream:
                seen.append(event.type)
                hold.set()  # the client has its first content: now the upstream fails
    assert seen[:2] == ["message_start", "content_block_start"]
    assert raised.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


async def test_a_cut_stream_ends_in_one_error_event(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    upstream.script(Reply(content=[text("partial answer here")], cut_after=5))
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    body = {"model": "claude-sonnet", "max_tokens": 64, "messages": HI, "stream": True}
    async with http.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        relayed = await response.read()
    events = [e for e in relayed.split(b"\n\n") if e]
    assert events[-1].startswith(b"event: error\ndata: ")
    error = orjson.loads(events[-1].split(b"data: ", 1)[1])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert b"message_stop" not in relayed


async def test_upstream_caller_faults_are_relayed_unchanged(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    upstream.script(ErrorReply(400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"))
    gateway = await start_gateway(config(claude("c", url, "ok-1"), claude("d", url, "ok-2")))
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert raised.value.body == {  # Claude Code's recovery reads this wording
        "type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 210000 tokens > 200000 maximum"},
        "request_id": "req_fake000001",
    }
    assert raised.value.response.headers["x-upstream-request-id"] == "req_fake000001"
    assert len(upstream.requests) == 1


async def test_account_faults_fail_over_then_answer_overloaded(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    bad, good = claude("c", url, "bad-key"), claude("d", url, "ok-2")
    good = ProviderConfig(**{**{f: getattr(good, f) for f in good.__slots__},  # type: ignore[attr-defined]
                             "accounts": (AccountConfig(name="ok-2", api_key=API_KEY, priority=1),)})
    gateway = await start_gateway(config(bad, good))
    message = await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert message.content[0].text == "Hello there"  # type: ignore[union-attr]
    assert [r.headers["x-api-key"] for r in upstream.requests] == ["sk-ant-bad-key", API_KEY]  # 401: quarantined
    upstream.script(ErrorReply(529, "overloaded_error", "Overloaded"))
    with pytest.raises(anthropic.InternalServerError) as raised:  # the last attempt's 529: our 502, Anthropic's 500
        await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert raised.value.status_code == 500 and raised.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert raised.value.response.headers["x-should-retry"] == "false"
    upstream.script(ErrorReply(429, "rate_limit_error", "slow down", headers={"retry-after": "30"}))
    with pytest.raises(anthropic.OverloadedError) as overloaded:  # no account left: our 503, Anthropic's 529
        await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert overloaded.value.status_code == 529
    assert overloaded.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert int(overloaded.value.response.headers["retry-after"]) >= 25


async def test_gateway_errors_are_anthropic_shaped(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    _, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1"), max_body_bytes=4096))
    sdk = client(gateway)
    cases: list[tuple[Any, type[anthropic.APIStatusError], int, str]] = [
        (client(gateway, key="wrong").messages.create(model="claude-sonnet", max_tokens=5, messages=HI),
         anthropic.AuthenticationError, 401, "authentication_error"),
        (sdk.messages.create(model="nope", max_tokens=5, messages=HI), anthropic.NotFoundError, 404, "not_found_error"),
        (client(gateway, key=OTHER_KEY).messages.create(model="claude-sonnet", max_tokens=5, messages=HI),
         anthropic.PermissionDeniedError, 403, "permission_error"),
        (sdk.messages.create(model="claude-sonnet", max_tokens=5, messages=[{"role": "user", "content": "x" * 8000}]),
         anthropic.ContentTooLargeError, 413, "request_too_large"),
        (sdk.messages.create(model="claude-sonnet", max_tokens=0, messages=HI), anthropic.BadRequestError, 400, "invalid_request_error"),
        (sdk.messages.create(model="claude-sonnet", max_tokens=5, messages=[{"role": "robot", "content": "x"}]),
         anthropic.BadRequestError, 400, "invalid_request_error"),
    ]
    for call, error_class, status, kind in cases:
        with pytest.raises(error_class) as raised:
            await call
        body = raised.value.body
        assert raised.value.status_code == status
        assert type(body) is dict and set(body) == {"type", "error", "request_id"}, body
        assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
        assert body["request_id"] == raised.value.response.headers["x-request-id"]
    async with http.post(f"{gateway.url}/v1/messages", data=b"{not json", headers={"x-api-key": KEY}) as response:
        assert response.status == 400
        assert (await response.json())["error"] == {"type": "invalid_request_error", "message": "The request body is not valid JSON."}


async def test_limits_reserve_max_tokens_and_answer_rate_limit_error(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    _, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1"), limits=Limits(rpm=2, tpm=100_000)))
    sent = orjson.dumps({"model": "claude-sonnet", "max_tokens": 32000, "messages": HI})
    async with http.post(f"{gateway.url}/v1/messages", data=sent, headers={"x-api-key": KEY}) as response:
        assert response.status == 200
        # reserved at admission: the body's size at 4 bytes a token + max_tokens (SPEC §6)
        assert int(response.headers["x-ratelimit-remaining-tokens"]) == 100_000 - (len(sent) // 4 + 32000)
    await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as raised:
        await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert raised.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert int(raised.value.response.headers["retry-after"]) >= 1
    # count_tokens is never admitted nor charged: it still answers with the key's rpm spent
    count = await client(gateway).messages.count_tokens(model="claude-sonnet", messages=HI)
    assert count.input_tokens > 0


async def test_a_spent_budget_is_billing_error(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(Reply(usage=usage(60, 50)))
    gateway = await start_gateway(config(claude("c", url, "ok-1"), budget_tokens=100))
    await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    with pytest.raises(anthropic.PaymentRequiredError) as raised:
        await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert raised.value.body["error"]["type"] == "billing_error"  # type: ignore[index]


async def test_sticky_sessions_follow_claude_codes_session_id(start_gateway: Any, aiohttp_server: Any) -> None:
    keys = tuple(f"{API_KEY}-{i}" for i in range(4))
    upstream = FakeAnthropic(api_keys=keys)
    url = str((await aiohttp_server(upstream.app())).make_url(""))
    provider = claude("c", url)
    provider = ProviderConfig(**{**{f: getattr(provider, f) for f in provider.__slots__},  # type: ignore[attr-defined]
                                 "accounts": tuple(AccountConfig(name=f"a{i}", api_key=k) for i, k in enumerate(keys))})
    gateway = await start_gateway(config(provider, sticky=True))
    sdk = client(gateway)
    used: set[str] = set()
    for session in ("s-1", "s-2", "s-3", "s-4"):
        seen = set()
        for _ in range(3):
            await sdk.messages.create(model="claude-sonnet", max_tokens=5, messages=HI,
                                      extra_headers={"X-Claude-Code-Session-Id": session})
            seen.add(upstream.requests[-1].headers["x-api-key"])
        assert len(seen) == 1, session
        used |= seen
    for user in ("user-a", "user-b", "user-c"):
        seen = set()
        for _ in range(3):
            await sdk.messages.create(model="claude-sonnet", max_tokens=5, messages=HI, metadata={"user_id": user})
            seen.add(upstream.requests[-1].headers["x-api-key"])
        assert len(seen) == 1, user


async def test_models_in_anthropics_shape(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    _, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    page = await client(gateway).models.list()
    assert [m.id for m in page.data] == ["claude-sonnet", "other"]
    assert page.data[0].type == "model" and page.data[0].display_name == "claude-sonnet"
    one = await client(gateway).models.retrieve("claude-sonnet")
    assert one.id == "claude-sonnet"
    with pytest.raises(anthropic.NotFoundError):
        await client(gateway, key=OTHER_KEY).models.retrieve("claude-sonnet")
    async with http.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert (await response.json())["object"] == "list"  # OpenAI's shape without anthropic-version


# (b) conversion to an OpenAI-format account ----------------------------------------------------


def chat_answer(message: dict[str, Any], finish: str = "stop", usage: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-9", "object": "chat.completion", "created": 1700000000, "model": "o",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": usage or {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    })


def answers(*bodies: bytes) -> Any:
    queue = list(bodies)

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(body=queue.pop(0), content_type="application/json")

    return handle


def chunk(delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
    payload: dict[str, Any] = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1700000000, "model": "o",
                               "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        payload["usage"] = usage
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def test_tool_use_over_several_turns_converted(start_gateway: Any, upstream: Upstream) -> None:
    upstream.handler = answers(
        chat_answer({"content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]}, "tool_calls"),
        chat_answer({"content": "It is sunny in Paris."}),
    )
    gateway = await start_gateway(config(openai_format("o", upstream.url, "a1"), upstream_model="gpt-up"))
    tools = [{"name": "weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    sdk = client(gateway)
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    first = await sdk.messages.create(model="claude-sonnet", max_tokens=200, messages=history, tools=tools, system="be brief")
    assert first.stop_reason == "tool_use" and first.model == "claude-sonnet"
    call = first.content[0]
    assert call.type == "tool_use" and call.name == "weather" and call.input == {"city": "Paris"}
    history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 24C"}]}]
    second = await sdk.messages.create(model="claude-sonnet", max_tokens=200, messages=history, tools=tools)
    assert second.content[0].text == "It is sunny in Paris."  # type: ignore[union-attr]
    assert (second.usage.input_tokens, second.usage.output_tokens) == (11, 3)
    sent = orjson.loads(upstream.requests[-1]["body"])
    assert upstream.requests[-1]["path"] == "/v1/chat/completions"
    assert upstream.requests[-1]["headers"]["authorization"] == "Bearer sk-openai-a1"
    assert sent["model"] == "gpt-up" and sent["max_completion_tokens"] == 200
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24C"},
    ]
    assert sent["tools"][0]["function"]["parameters"] == tools[0]["input_schema"]
    assert orjson.loads(upstream.requests[0]["body"])["messages"][0] == {"role": "system", "content": "be brief"}


async def test_images_and_thinking_converted(start_gateway: Any, upstream: Upstream) -> None:
    upstream.handler = answers(chat_answer({"content": "A red square.", "reasoning_content": "Looking at pixels."},
                                           usage={"prompt_tokens": 1200, "completion_tokens": 5, "total_tokens": 1205,
                                                  "prompt_tokens_details": {"cached_tokens": 1000}}))
    gateway = await start_gateway(config(openai_format("o", upstream.url, "a1")))
    png = base64.b64encode(b"\x89PNG fake").decode()
    message = await client(gateway).messages.create(
        model="claude-sonnet", max_tokens=5000, thinking={"type": "enabled", "budget_tokens": 4096},
        messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            {"type": "text", "text": "What is it?"}]}],
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert message.content[0].thinking == "Looking at pixels."  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (200, 1000)  # B25
    sent = orjson.loads(upstream.requests[-1]["body"])
    assert sent["reasoning_effort"] == "high"
    assert sent["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "text", "text": "What is it?"},
    ]


async def test_a_converted_stream_with_parallel_tools(start_gateway: Any, upstream: Upstream) -> None:
    def tool(index: int, *, id: str | None = None, name: str | None = None, args: str = "") -> dict[str, Any]:
        function: dict[str, Any] = {"arguments": args}
        if name is not None:
            function["name"] = name
        call: dict[str, Any] = {"index": index, "function": function}
        if id is not None:
            call.update(id=id, type="function")
        return {"tool_calls": [call]}

    upstream.handler = stream_handler([
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Checking both."}),
        chunk(tool(0, id="call_a", name="weather", args='{"ci')),
        chunk(tool(1, id="call_b", name="time", args='{"tz":')),
        chunk(tool(0, args='ty":"Paris"}')),
        chunk(tool(1, args='"UTC"}')),
        chunk({}, "tool_calls"),
        chunk(None, usage={"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70,
                           "prompt_tokens_details": {"cached_tokens": 40}}),
        b"data: [DONE]\n\n",
    ])
    gateway = await start_gateway(config(openai_format("o", upstream.url, "a1")))
    async with client(gateway).messages.stream(model="claude-sonnet", max_tokens=64, messages=HI) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == ["Checking both."]
    assert [(b.type, getattr(b, "input", None)) for b in final.content] == [
        ("text", None), ("tool_use", {"city": "Paris"}), ("tool_use", {"tz": "UTC"})]  # B27
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens, final.usage.output_tokens) == (10, 40, 20)
    assert orjson.loads(upstream.requests[-1]["body"])["stream_options"] == {"include_usage": True}


async def test_a_converted_stream_has_every_event_named(start_gateway: Any, upstream: Upstream, http: Any) -> None:
    upstream.handler = stream_handler([chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}), chunk({}, "stop"),
                                 chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
                                 b"data: [DONE]\n\n"])
    gateway = await start_gateway(config(openai_format("o", upstream.url, "a1")))
    body = {"model": "claude-sonnet", "max_tokens": 64, "messages": HI, "stream": True}
    async with http.post(f"{gateway.url}/v1/messages", json=body, headers={"x-api-key": KEY}) as response:
        relayed = await response.read()
    events = [e for e in relayed.split(b"\n\n") if e]
    names = [e.split(b"\n", 1)[0] for e in events]
    assert names == [b"event: " + n for n in (b"message_start", b"content_block_start", b"content_block_delta",
                                              b"content_block_stop", b"message_delta", b"message_stop")]
    delta = orjson.loads(events[-2].split(b"data: ", 1)[1])
    assert delta["usage"]["output_tokens"] == 1 and delta["delta"]["stop_reason"] == "end_turn"


async def test_a_converted_upstreams_caller_fault_is_anthropic_shaped(start_gateway: Any, upstream: Upstream) -> None:
    error = {"error": {"message": "This model's maximum context length is 128000 tokens.", "type": "invalid_request_error",
                       "param": "messages", "code": "context_length_exceeded"}}
    upstream.handler = completion_handler(400, orjson.dumps(error))
    gateway = await start_gateway(config(openai_format("o", upstream.url, "a1")))
    with pytest.raises(anthropic.BadRequestError) as raised:
        await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert raised.value.body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "This model's maximum context length is 128000 tokens."}}


async def test_a_converted_stream_error_before_content_fails_over(start_gateway: Any, make_upstream: Any) -> None:
    broken, good = await make_upstream(), await make_upstream()
    broken.handler = stream_handler([chunk({"role": "assistant", "content": ""}),
                               b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'])
    good.handler = stream_handler([chunk({"role": "assistant", "content": ""}), chunk({"content": "served"}), chunk({}, "stop"),
                             b"data: [DONE]\n\n"])
    gateway = await start_gateway(config(openai_format("o", broken.url, "a1"), openai_format("p", good.url, "a2")))
    async with client(gateway).messages.stream(model="claude-sonnet", max_tokens=64, messages=HI) as stream:
        final = await stream.get_final_message()
    assert final.content[0].text == "served"  # type: ignore[union-attr]


async def test_claude_code_traffic_converts_cleanly(start_gateway: Any, upstream: Upstream, http: Any) -> None:
    upstream.handler = stream_handler([chunk({"role": "assistant", "content": ""}), chunk({"content": "Done."}), chunk({}, "stop"),
                                 chunk(None, usage={"prompt_tokens": 900, "completion_tokens": 2, "total_tokens": 902}),
                                 b"data: [DONE]\n\n"])
    gateway = await start_gateway(config(openai_format("o", upstream.url, "a1"), upstream_model="gpt-up"))
    async with http.post(f"{gateway.url}/v1/messages?beta=true", data=claude_code_request(), headers=claude_code_headers()) as response:
        relayed = await response.read()
    assert relayed.endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    sent = orjson.loads(upstream.requests[-1]["body"])
    assert b"cache_control" not in upstream.requests[-1]["body"] and b"anthropic" not in upstream.requests[-1]["body"]
    assert "anthropic-beta" not in upstream.requests[-1]["headers"]
    assert sent["messages"][0] == {"role": "system", "content": "You are Claude Code.\n\nEnvironment: linux"}
    assert sent["max_completion_tokens"] == 32000 and sent["reasoning_effort"] == "high"
    assert sent["safety_identifier"] == "user_abc_account_def_session_0b7c5a1e"
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "tool"]
    assert sent["messages"][2]["reasoning_content"] == "Look first."
    assert sent["tools"][0]["function"]["parameters"]["additionalProperties"] is False
    # count_tokens has no OpenAI-format counterpart: an estimate that counts the tools too (B26)
    async with http.post(f"{gateway.url}/v1/messages/count_tokens?beta=true", data=count_request(claude_code_request()),
                         headers=claude_code_headers()) as response:
        estimate = (await response.json())["input_tokens"]
    async with http.post(f"{gateway.url}/v1/messages/count_tokens", data=orjson.dumps({
            "model": "claude-sonnet", "messages": orjson.loads(claude_code_request())["messages"]}),
            headers=claude_code_headers()) as response:
        without_tools = (await response.json())["input_tokens"]
    assert estimate > without_tools > 0
    assert len(upstream.requests) == 1  # counted in the gateway


async def test_metrics_and_access_log_name_the_api(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    _, url = fake
    lines = Lines()
    gateway = await start_gateway(config(claude("c", url, "ok-1")), access_log=lines.log)
    await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    await client(gateway).messages.count_tokens(model="claude-sonnet", messages=HI)
    message, count = await lines.wait_for(2)
    assert (message["api"], message["provider_type"], message["status"]) == ("messages", "anthropic", 200)
    assert (message["prompt_tokens"], message["completion_tokens"]) == (12, 5)
    assert (count["api"], count["status"], count["prompt_tokens"]) == ("count_tokens", 200, None)
    exposition = await (await http.get(f"{gateway.url}/metrics")).text()
    assert 'llm_proxy_requests_total{api="messages",error_type="",key="team-a",model="claude-sonnet",status="200"} 1.0' in exposition
    assert 'llm_proxy_tokens_total{api="messages",key="team-a",model="claude-sonnet",type="prompt"} 12.0' in exposition


async def test_count_tokens_relays_the_upstream_or_estimates(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    counted = await client(gateway).messages.count_tokens(model="claude-sonnet", messages=HI, system="be brief")
    sent = upstream.requests[-1]
    assert counted.input_tokens == len(sent.body) // 4  # the fake's figure, relayed
    assert sent.json == {"model": "claude-up-1", "messages": HI, "system": "be brief"}
    with pytest.raises(anthropic.BadRequestError) as raised:  # the upstream's caller fault, unchanged
        await client(gateway).messages.count_tokens(model="claude-sonnet", messages=HI, extra_body={"seed": 1})
    assert raised.value.body["error"]["message"] == "seed: Extra inputs are not permitted"  # type: ignore[index]
    broken = await start_gateway(config(claude("c", url, "bad-key")))
    estimated = await client(broken).messages.count_tokens(model="claude-sonnet", messages=HI)
    assert estimated.input_tokens > 0  # the account refused (401): estimated, never 0
    assert upstream.requests[-1].headers["x-api-key"] == "sk-ant-bad-key"
    async with http.post(f"{gateway.url}/v1/messages/count_tokens", json={"model": "claude-sonnet"},
                         headers={"x-api-key": KEY}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_a_404_from_an_anthropic_account_fails_over(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(ErrorReply(404, "not_found_error", "model: claude-up-1"))
    gateway = await start_gateway(config(claude("c", url, "ok-1"), claude("d", url, "ok-2")))
    message = await client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=HI)
    assert message.content[0].text == "Hello there" and len(upstream.requests) == 2  # type: ignore[union-attr]


async def test_headers_that_cannot_be_forwarded_are_refused(start_gateway: Any, fake: tuple[FakeAnthropic, str], http: Any) -> None:
    upstream, url = fake
    gateway = await start_gateway(config(claude("c", url, "ok-1")))
    body = orjson.dumps({"model": "claude-sonnet", "max_tokens": 5, "messages": HI})
    for name in ("anthropic-beta", "anthropic-version"):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            headers = {"x-api-key": KEY, name: "caf\u00e9".encode().decode("latin-1")}  # not ASCII on the wire
            async with http.post(f"{gateway.url}{path}", data=body, headers=headers) as response:
                assert response.status == 400, (name, path)
                assert (await response.json())["error"]["type"] == "invalid_request_error"
    assert upstream.requests == []


# guardrails on the Messages API ----------------------------------------------------------------


def guarded(config: Config, *rails: GuardrailConfig) -> Config:
    keys = (dataclasses.replace(config.keys[0], guardrails=tuple(r.name for r in rails)), *config.keys[1:])
    return dataclasses.replace(config, keys=keys, guardrails=MappingProxyType({r.name: r for r in rails}))


async def test_a_guardrail_block_is_anthropic_shaped_before_admission(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    gateway = await start_gateway(guarded(config(claude("c", url, "ok-1"), limits=Limits(tpm=1000)),
                                          GuardrailConfig(name="pii-checker", action="block")))
    messages = [{"role": "user", "content": [{"type": "text", "text": "my card is 4111 1111 1111 1111"}]}]
    for create in (client(gateway).messages.create(model="claude-sonnet", max_tokens=5, messages=messages),
                   client(gateway).messages.count_tokens(model="claude-sonnet", messages=messages)):
        with pytest.raises(anthropic.BadRequestError) as raised:
            await create
        assert raised.value.body == {
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "Content blocked by guardrail",
                      "guardrail_key": "pii-checker", "action": "block",
                      "findings": [{"category": "credit_card", "message": "PII detected", "location": "messages[0].content[0].text"}]},
            "request_id": raised.value.response.headers["x-request-id"],
        }
        assert "x-ratelimit-remaining-tokens" not in raised.value.response.headers  # never admitted
    assert upstream.requests == []


async def test_redaction_on_both_paths_and_in_a_passed_through_stream(start_gateway: Any, fake: tuple[FakeAnthropic, str], upstream: Upstream) -> None:
    anthropic_up, url = fake
    rails = (GuardrailConfig(name="mask", action="redact", apply_to=frozenset({"request", "response"}), categories=("email",)),)
    messages = [{"role": "user", "content": "write to jane.doe@example.com please"}]
    passed = await start_gateway(guarded(config(claude("c", url, "ok-1")), *rails))
    anthropic_up.script(Reply(content=[text("Sure, mailing bob.smith@example.org now")], piece=5))
    async with client(passed).messages.stream(model="claude-sonnet", max_tokens=50, messages=messages) as stream:
        texts = "".join([t async for t in stream.text_stream])
    assert texts == "Sure, mailing [REDACTED:EMAIL] now"  # caught across 5-character deltas
    assert anthropic_up.requests[-1].json["messages"][0]["content"] == "write to [REDACTED:EMAIL] please"
    upstream.handler = completion_handler(200, chat_answer({"content": "ok"}))
    converted = await start_gateway(guarded(config(openai_format("o", upstream.url, "a1")), *rails))
    await client(converted).messages.create(model="claude-sonnet", max_tokens=50, messages=messages)
    assert orjson.loads(upstream.requests[-1]["body"])["messages"][0]["content"] == "write to [REDACTED:EMAIL] please"


async def test_messages_are_priced_with_their_cache_tokens(start_gateway: Any, fake: tuple[FakeAnthropic, str]) -> None:
    """Cost of a Messages request from Anthropic's disjoint counters: uncached input at `input`,
    cache reads at `cached_input`, cache writes at `cache_write`, output at `output` (SPEC §12);
    the same passed through, streamed or not."""
    upstream, url = fake
    reply = Reply(usage=usage(100, 20, cache_read=1000, cache_write=50))
    upstream.script(reply, reply)
    price = Price(input=3_000_000, output=15_000_000, cached_input=300_000, cache_write=3_750_000)  # $/M × 10^6
    base = config(claude("c", url, "ok-1"))
    models = {name: dataclasses.replace(m, price=price) for name, m in base.models.items()}
    lines = Lines()
    gateway = await start_gateway(dataclasses.replace(base, models=MappingProxyType(models)), access_log=lines.log)
    await client(gateway).messages.create(model="claude-sonnet", max_tokens=50, messages=HI)
    async with client(gateway).messages.stream(model="claude-sonnet", max_tokens=50, messages=HI) as stream:
        await stream.get_final_message()
    expected = (100 * 3 + 1000 * 0.3 + 50 * 3.75 + 20 * 15) / 1e6  # USD
    for line in await lines.wait_for(2):
        assert (line["prompt_tokens"], line["completion_tokens"]) == (1150, 20)
        assert line["cost_usd"] == pytest.approx(expected, abs=1e-9)
