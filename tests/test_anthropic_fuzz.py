"""The converters on arbitrary input: a request that passed validation converts or is refused with
a GatewayError 400; any upstream bytes convert or raise ValueError (or the stream's own error).
Nothing else escapes, whatever the shapes inside."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from proxy.caps import Caps
from proxy.errors import GatewayError
from proxy.providers.anthropic_answer import from_anthropic
from proxy.providers.anthropic_errors import caller_error, classify_anthropic
from proxy.providers.anthropic_request import to_anthropic
from proxy.providers.anthropic_stream import AnthropicStream, AnthropicStreamError
from proxy.validation import parse_chat_request

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = st.sampled_from([
    "type", "text", "content", "role", "tool_calls", "id", "function", "name", "arguments", "tool_call_id",
    "image_url", "url", "file", "file_data", "file_id", "cache_control", "thinking_blocks", "signature",
    "thinking", "data", "refusal", "function_call", "parameters", "json_schema", "schema", "mode", "tools",
    "allowed_tools", "properties", "items", "index", "delta", "partial_json", "message", "usage", "input",
])
STRINGS = st.sampled_from([
    "", " ", "text", "image_url", "file", "function", "tool_use", "tool_result", "thinking", "auto", "required",
    "none", "allowed_tools", "json_schema", "json_object", "data:image/png;base64,AA", "https://e.com/a.png",
    "data:application/pdf;base64,AA", "call_1", "functions.x:1", '{"a":1}', "{bad", "high", "user", "assistant",
]) | st.text(max_size=8)
LEAVES = st.none() | st.booleans() | st.integers(-3, 3) | STRINGS
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=25)
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])
MESSAGE = st.builds(lambda role, rest: {**rest, "role": role}, ROLES, st.dictionaries(KEYS, JSON, max_size=4))
TOP = st.fixed_dictionaries({}, optional={
    "tools": st.lists(JSON, max_size=3), "tool_choice": JSON, "parallel_tool_calls": JSON, "response_format": JSON,
    "reasoning_effort": JSON, "functions": JSON, "function_call": JSON, "top_k": JSON, "user": JSON,
    "modalities": JSON, "stop": st.lists(STRINGS, max_size=4), "max_tokens": st.integers(1, 5000),
})
CAPS = st.builds(Caps, max_output_tokens=st.none() | st.integers(1, 4000), thinking=st.sampled_from(["budget", "adaptive", "none"]),
                 sampling_params=st.booleans(), prefill=st.booleans(), forced_tool_choice=st.booleans(),
                 structured_outputs=st.booleans())


@FUZZ
@given(messages=st.lists(MESSAGE, min_size=1, max_size=6), top=TOP, caps=CAPS)
def test_a_validated_request_converts_or_is_refused_with_a_400(messages: list[dict[str, Any]], top: dict[str, Any], caps: Caps) -> None:
    body = orjson.dumps({"model": "m", "messages": messages, **top})
    try:
        data = parse_chat_request(body).data
        converted = to_anthropic(data, model="claude", caps=caps, default_max_tokens=1024)
    except GatewayError as error:
        assert error.status == 400
        return
    assert orjson.loads(converted.body)["messages"]


EVENT_TYPES = st.sampled_from([
    "message_start", "ping", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop", "error", "other",
])
EVENT = st.builds(lambda kind, rest: {**rest, "type": kind} if type(rest) is dict else rest, EVENT_TYPES, JSON)


START = {"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {"input_tokens": 1}}}
RANDOM_BLOCK = st.builds(lambda kind, rest: {**rest, "type": kind}, st.sampled_from(["text", "tool_use", "thinking", "other"]),
                         st.dictionaries(KEYS, JSON, max_size=4))
BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": STRINGS}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": STRINGS, "name": STRINGS, "input": JSON}),
    st.fixed_dictionaries({"type": st.just("thinking"), "thinking": STRINGS, "signature": STRINGS}),
    RANDOM_BLOCK,
)
DELTA = st.one_of(
    st.fixed_dictionaries({"type": st.just("text_delta"), "text": STRINGS}),
    st.fixed_dictionaries({"type": st.just("input_json_delta"), "partial_json": STRINGS}),
    st.fixed_dictionaries({"type": st.just("thinking_delta"), "thinking": STRINGS}),
    st.builds(lambda rest: {**rest, "type": "other"}, st.dictionaries(KEYS, JSON, max_size=3)),
)
BLOCK_EVENT = st.builds(lambda index, block: {"type": "content_block_start", "index": index, "content_block": block}, st.integers(0, 2), BLOCK) | st.builds(
    lambda index, delta: {"type": "content_block_delta", "index": index, "delta": delta}, st.integers(0, 2), DELTA) | st.builds(
    lambda index: {"type": "content_block_stop", "index": index}, st.integers(0, 2))


@FUZZ
@given(events=st.lists(st.one_of(BLOCK_EVENT, BLOCK_EVENT, BLOCK_EVENT, EVENT), max_size=8), started=st.booleans(), stopped=st.booleans(), cut=st.integers(0, 400), crlf=st.booleans())
def test_any_stream_converts_or_raises_value_error(events: list[Any], started: bool, stopped: bool, cut: int, crlf: bool) -> None:
    events = [START] * started + events + [{"type": "message_stop"}] * stopped
    raw = b"".join(b"event: x\ndata: " + orjson.dumps(event) + b"\n\n" for event in events)
    raw = raw.replace(b"\n", b"\r\n") if crlf else raw
    stream = AnthropicStream(include_usage=True, created=1)
    try:
        out = stream.feed(raw[:cut]) + stream.feed(raw[cut:])
    except (ValueError, AnthropicStreamError):
        return
    for event in out.split(b"\n\n"):
        if event and event != b"data: [DONE]":
            ChatCompletionChunk.model_validate_json(event[6:])  # whatever came in, the client gets valid chunks


@FUZZ
@given(answer=JSON, content=st.lists(BLOCK, max_size=4))
def test_any_answer_converts_or_raises_value_error(answer: Any, content: list[Any]) -> None:
    if type(answer) is dict:
        answer = {"type": "message", "id": "m", "model": "x", "content": content, "usage": {}, **answer}
    try:
        converted = from_anthropic(orjson.dumps(answer), created=1, json_mode=True)
    except ValueError:
        return
    ChatCompletion.model_validate_json(converted.body)


@FUZZ
@given(status=st.integers(400, 599), payload=JSON, headers=st.dictionaries(st.sampled_from([
    "retry-after", "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset", "x-ratelimit-reset-tokens",
]), STRINGS, max_size=3))
def test_any_error_answer_classifies_and_renders(status: int, payload: Any, headers: dict[str, str]) -> None:
    body = orjson.dumps(payload)
    classify_anthropic(status, headers, body, 0.0, wall_now=1e9)
    assert set(orjson.loads(caller_error(status, body))["error"]) == {"message", "type", "param", "code"}
