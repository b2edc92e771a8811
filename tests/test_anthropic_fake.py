"""The fake Anthropic upstream is faithful: the official `anthropic` SDK, pointed at it, parses its
JSON answers, its streams and its errors; and the converters work over HTTP against it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.caps import Caps
from proxy.faults import Fault
from proxy.providers.anthropic_answer import from_anthropic
from proxy.providers.anthropic_errors import caller_error, classify_anthropic, upstream_request_id
from proxy.providers.anthropic_request import to_anthropic
from proxy.providers.anthropic_stream import AnthropicStream, AnthropicStreamError

from .fakeanthropic import API_KEY, ErrorReply, FakeAnthropic, Reply, redacted_thinking, text, thinking, tool_use, usage

WALL = 1_700_000_000.0
ASK = {"model": "claude-fake-1", "max_tokens": 256, "messages": [{"role": "user", "content": "Weather?"}]}
BLOCKS = [
    thinking("The user wants weather in two cities."),
    text("Checking both cities now."),
    tool_use("toolu_01A", "get_weather", {"city": "Paris", "units": ["c", "f"], "deep": {"a": 1}}),
    tool_use("toolu_01B", "now", {}),
]
TOOL_REPLY = Reply(content=BLOCKS, stop_reason="tool_use", usage=usage(472, 89, cache_read=2048, cache_write=100), piece=5)


@pytest.fixture
async def fake(aiohttp_server: Any) -> AsyncIterator[tuple[FakeAnthropic, str]]:
    upstream = FakeAnthropic()
    server = await aiohttp_server(upstream.app())
    yield upstream, str(server.make_url("/"))


def sdk(base_url: str, api_key: str = API_KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0)


async def test_the_sdk_parses_a_json_answer_and_the_fake_records_the_exact_request(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(TOOL_REPLY)
    async with sdk(url) as client:
        message = await client.messages.create(**ASK)  # type: ignore[call-overload]
    assert [block.type for block in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].signature == BLOCKS[0]["signature"]  # type: ignore[union-attr]
    assert message.content[2].input == BLOCKS[2]["input"]  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (472, 2048, 100)
    assert message._request_id is not None and message._request_id.startswith("req_fake")
    received = upstream.requests[-1]
    assert (received.method, received.path) == ("POST", "/v1/messages")
    assert received.headers["authorization"] == f"Bearer {API_KEY}" and received.headers["anthropic-version"]
    assert received.json == ASK


async def test_the_sdk_streams_text_and_rebuilds_the_final_message(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(TOOL_REPLY)
    async with sdk(url) as client:
        async with client.messages.stream(**ASK) as stream:  # type: ignore[arg-type]
            texts = [piece async for piece in stream.text_stream]
            final = await stream.get_final_message()
    assert "".join(texts) == BLOCKS[1]["text"] and len(texts) > 1
    assert upstream.requests[-1].json == {**ASK, "stream": True}
    assert [block.to_dict() for block in final.content] == BLOCKS
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (472, 89, 2048)


async def test_the_sdk_streams_redacted_thinking_and_an_empty_tool_input(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(Reply(content=[redacted_thinking("EmwKAhgB"), tool_use("toolu_1", "now", {})], stop_reason="tool_use"))
    async with sdk(url) as client:
        async with client.messages.stream(**ASK) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_message()
    assert [block.to_dict() for block in final.content] == [redacted_thinking("EmwKAhgB"), tool_use("toolu_1", "now", {})]


ERRORS = {
    "429 with retry-after": (ErrorReply(429, "rate_limit_error", "Rate limited", {"retry-after": "7"}), anthropic.RateLimitError),
    "529 overloaded": (ErrorReply(529, "overloaded_error", "Overloaded"), anthropic.OverloadedError),
    "500 api_error": (ErrorReply(500, "api_error", "Internal server error"), anthropic.InternalServerError),
    "401": (ErrorReply(401, "authentication_error", "invalid x-api-key"), anthropic.AuthenticationError),
    "402 billing": (ErrorReply(402, "billing_error", "Your credit balance is too low"), anthropic.PaymentRequiredError),
    "403": (ErrorReply(403, "permission_error", "Not allowed"), anthropic.PermissionDeniedError),
    "404 model": (ErrorReply(404, "not_found_error", "model: claude-nope"), anthropic.NotFoundError),
    "400": (ErrorReply(400, "invalid_request_error", "messages: text content blocks must be non-empty"), anthropic.BadRequestError),
}


@pytest.mark.parametrize(("reply", "raised"), ERRORS.values(), ids=ERRORS.keys())
async def test_the_sdk_raises_its_own_error_class_for_each_error_answer(
    fake: tuple[FakeAnthropic, str], reply: ErrorReply, raised: type[anthropic.APIStatusError]
) -> None:
    upstream, url = fake
    upstream.script(reply)
    async with sdk(url) as client:
        with pytest.raises(raised) as caught:
            await client.messages.create(**ASK)  # type: ignore[call-overload]
    assert caught.value.status_code == reply.status
    assert caught.value.body == {"type": "error", "error": {"type": reply.type, "message": reply.message},
                                 "request_id": caught.value.request_id}
    for name, value in reply.headers.items():
        assert caught.value.response.headers[name] == value


async def test_an_in_band_error_after_message_start_raises_in_the_sdk(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(Reply(error_after=2))
    async with sdk(url) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with client.messages.stream(**ASK) as stream:  # type: ignore[arg-type]
                await stream.get_final_message()
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


async def test_the_fake_refuses_what_anthropic_refuses(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    async with aiohttp.ClientSession() as session:
        cases = [
            ({"x-api-key": API_KEY}, ASK, 400, "anthropic-version: header is required"),
            ({"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, ASK, 401, "invalid x-api-key"),
            ({"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}, {**ASK, "seed": 1}, 400, "seed: Extra inputs are not permitted"),
            ({"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}, {"model": "m", "messages": ASK["messages"]}, 400, "max_tokens: Field required"),
        ]
        for headers, body, status, message in cases:
            async with session.post(f"{url}v1/messages", data=orjson.dumps(body), headers=headers) as response:
                assert response.status == status
                assert response.headers["request-id"].startswith("req_fake")
                assert orjson.loads(await response.read())["error"]["message"] == message
    assert len(upstream.requests) == len(cases)


async def test_count_tokens_and_models_through_the_sdk(fake: tuple[FakeAnthropic, str]) -> None:
    _, url = fake
    async with sdk(url) as client:
        counted = await client.messages.count_tokens(model="claude-fake-1", messages=ASK["messages"])  # type: ignore[arg-type]
        models = await client.models.list()
    assert counted.input_tokens > 0
    assert [model.id for model in models.data] == ["claude-fake-1"]


async def post(url: str, body: bytes) -> tuple[int, list[bytes]]:
    """The converted body to the fake, as a provider would send it; the answer's chunks as read."""
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}v1/messages", data=body, headers=headers) as response:
            return response.status, [chunk async for chunk in response.content.iter_any()]


OPENAI_ASK = {
    "model": "claude", "max_tokens": 300, "seed": 7, "user": "u-1", "some_unknown_field": True,
    "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Paris?"}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
}


async def test_a_converted_request_is_accepted_and_its_answer_converts(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(TOOL_REPLY)
    converted = to_anthropic(OPENAI_ASK, model="claude-fake-1", caps=Caps(), default_max_tokens=1024)
    status, chunks = await post(url, converted.body)
    assert status == 200 and converted.dropped == ("seed",)
    assert "some_unknown_field" not in upstream.requests[-1].json
    completion = ChatCompletion.model_validate_json(from_anthropic(b"".join(chunks), created=1).body)
    calls = completion.choices[0].message.tool_calls or []
    assert [call.function.name for call in calls] == ["get_weather", "now"]  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


async def test_a_converted_stream_as_read_from_the_socket(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(TOOL_REPLY)
    converted = to_anthropic({**OPENAI_ASK, "stream": True, "stream_options": {"include_usage": True}},
                             model="claude-fake-1", caps=Caps(), default_max_tokens=1024)
    status, chunks = await post(url, converted.body)
    stream = AnthropicStream(include_usage=converted.include_usage, created=1)
    out = b"".join(stream.feed(chunk) for chunk in chunks)
    assert status == 200 and stream.done
    events = [event for event in out.split(b"\n\n") if event]
    assert events[-1] == b"data: [DONE]"
    parsed = [ChatCompletionChunk.model_validate_json(event[6:]) for event in events[:-1]]
    assert parsed[-1].usage is not None and parsed[-1].usage.prompt_tokens == 472 + 2048 + 100


async def test_an_image_url_reaches_the_upstream_as_a_url_and_is_never_fetched(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    image = f"{url}cat.png"
    ask = {**OPENAI_ASK, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image}}]}]}
    status, _ = await post(url, to_anthropic(ask, model="claude-fake-1", caps=Caps(), default_max_tokens=64).body)
    assert status == 200
    assert [(r.method, r.path) for r in upstream.requests] == [("POST", "/v1/messages")]
    sent = upstream.requests[0].json["messages"][0]["content"][1]
    assert sent == {"type": "image", "source": {"type": "url", "url": image}}


async def test_an_in_band_error_before_any_content_leaves_the_client_untouched(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    upstream.script(Reply(error_after=2))
    _, chunks = await post(url, to_anthropic({**ASK, "stream": True}, model="m", caps=Caps(), default_max_tokens=64).body)
    stream = AnthropicStream(include_usage=False, created=1)
    with pytest.raises(AnthropicStreamError) as caught:
        for chunk in chunks:
            assert stream.feed(chunk) == b""
    assert (caught.value.verdict_status, caught.value.error_type) == (529, "overloaded_error")
    assert not stream.committed


async def test_error_answers_as_read_from_the_socket_classify_and_relay(fake: tuple[FakeAnthropic, str]) -> None:
    upstream, url = fake
    reset = datetime.fromtimestamp(WALL + 42, timezone.utc).isoformat()
    upstream.script(
        ErrorReply(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit",
                   {"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": reset,
                    "anthropic-ratelimit-requests-remaining": "49", "anthropic-ratelimit-requests-reset": reset}),
        ErrorReply(400, "invalid_request_error", "max_tokens: must be at least 1"),
    )
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}v1/messages", data=orjson.dumps(ASK), headers=headers) as response:
            verdict = classify_anthropic(response.status, response.headers, await response.read(), 10.0, wall_now=WALL)
        assert (verdict.fault, verdict.until) == (Fault.COOLDOWN, pytest.approx(52.0))
        async with session.post(f"{url}v1/messages", data=orjson.dumps(ASK), headers=headers) as response:
            body = await response.read()
            assert classify_anthropic(response.status, response.headers, body, 10.0, wall_now=WALL).fault is Fault.CALLER
            assert upstream_request_id(response.headers) == response.headers["request-id"]
    assert orjson.loads(caller_error(400, body))["error"] == {
        "message": "max_tokens: must be at least 1", "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}
