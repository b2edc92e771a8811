"""Anthropic Messages request → OpenAI body, OpenAI answer → Anthropic message, count_tokens
estimate (reference §7.4, §7.5, §7.7; B25, B26, B29)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.types import Message

from proxy.errors import GatewayError
from proxy.messages_answer import to_anthropic_answer
from proxy.messages_request import estimate_tokens, to_openai, tool_name
from proxy.messages_validation import validate_messages

BASE: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 1024, "messages": [{"role": "user", "content": "hi"}]}


def convert(**fields: Any) -> dict[str, Any]:
    data = {**BASE, **fields}
    validate_messages(data)
    return dict(orjson.loads(to_openai(data, model="gpt-x").body))


USER_BLOCKS = [
    ([{"type": "text", "text": "a"}, {"type": "text", "text": ""}, {"type": "text", "text": "b"}], [{"role": "user", "content": "a\n\nb"}]),
    (
        [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "QUJD"}}, {"type": "text", "text": "what?"}],
        [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}, {"type": "text", "text": "what?"}]}],
    ),
    (
        [{"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}],
    ),
    (
        [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "UERG"}}],
        [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,UERG"}}]}],
    ),
    (
        [{"type": "text", "text": "after", "cache_control": {"type": "ephemeral"}},
         {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
         {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
          "content": [{"type": "text", "text": "boom"}]}],
        [{"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
         {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
         {"role": "user", "content": "after"}],
    ),
    (
        [{"type": "tool_result", "tool_use_id": "t", "content": [
            {"type": "text", "text": "see"}, {"type": "image", "source": {"type": "url", "url": "https://x.test/i"}}]}],
        [{"role": "tool", "tool_call_id": "t", "content": "see"},
         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/i"}}]}],
    ),
]


@pytest.mark.parametrize("blocks, expected", USER_BLOCKS)
def test_user_blocks(blocks: list[Any], expected: list[Any]) -> None:
    assert convert(messages=[{"role": "user", "content": blocks}])["messages"] == expected


ASSISTANT_BLOCKS = [
    ("plain", [{"role": "assistant", "content": "plain"}]),
    ([{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "redacted_thinking", "data": "x"},
      {"type": "text", "text": "ok"},
      {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
     [{"role": "assistant", "content": "ok", "reasoning_content": "hmm", "tool_calls": [
         {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}]),
    ([{"type": "tool_use", "id": "toolu_2", "name": "noargs", "input": {}}],
     [{"role": "assistant", "content": None, "tool_calls": [
         {"id": "toolu_2", "type": "function", "function": {"name": "noargs", "arguments": "{}"}}]}]),
    ([{"type": "text", "text": ""}], []),
]


@pytest.mark.parametrize("content, expected", ASSISTANT_BLOCKS)
def test_assistant_blocks(content: Any, expected: list[Any]) -> None:
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}]
    assert convert(messages=messages)["messages"][1:] == expected


SYSTEMS = [
    ("be brief", "be brief"),
    ([{"type": "text", "text": "one", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "two"}], "one\n\ntwo"),
]


@pytest.mark.parametrize("system, expected", SYSTEMS)
def test_system(system: Any, expected: str) -> None:
    assert convert(system=system)["messages"][0] == {"role": "system", "content": expected}


TOP_LEVEL = [
    ({}, {"max_completion_tokens": 1024}),
    ({"temperature": 0.5, "top_p": 0.9, "top_k": 5}, {"temperature": 0.5, "top_p": 0.9}),
    ({"stop_sequences": ["END", "STOP"]}, {"stop": ["END", "STOP"]}),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, {"reasoning_effort": "low"}),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, {"reasoning_effort": "medium"}),
    ({"thinking": {"type": "enabled", "budget_tokens": 10000}}, {"reasoning_effort": "high"}),
    ({"thinking": {"type": "adaptive"}}, {"reasoning_effort": "medium"}),
    ({"thinking": {"type": "adaptive"}, "output_config": {"effort": "max"}}, {"reasoning_effort": "max"}),
    ({"thinking": {"type": "disabled"}}, {}),
    ({"metadata": {"user_id": "u-1"}}, {"safety_identifier": "u-1"}),
    ({"stream": True}, {"stream": True, "stream_options": {"include_usage": True}}),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
     {"response_format": {"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True}}}),
    ({"service_tier": "auto", "container": "c", "unknown_field": 1}, {}),
]


@pytest.mark.parametrize("fields, expected", TOP_LEVEL)
def test_top_level_fields(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    out = convert(**fields)
    out.pop("messages")
    assert out == {"model": "gpt-x", "max_completion_tokens": 1024, **expected}


def test_dropped_fields_are_named() -> None:
    data = {**BASE, "top_k": 3, "service_tier": "auto", "tools": [{"type": "web_search_20250305", "name": "web_search"}]}
    converted = to_openai(data, model="m")
    assert converted.dropped == ("top_k", "service_tier", "server_tools")
    assert "tools" not in orjson.loads(converted.body)


WEATHER = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}}, "additionalProperties": False}}

TOOL_CHOICES = [
    (None, None, None),
    ({"type": "auto"}, "auto", None),
    ({"type": "any"}, "required", None),
    ({"type": "none"}, "none", None),
    ({"type": "tool", "name": "get_weather"}, {"type": "function", "function": {"name": "get_weather"}}, None),
    ({"type": "tool", "name": "undeclared"}, None, None),
    ({"type": "auto", "disable_parallel_tool_use": True}, "auto", False),
]


@pytest.mark.parametrize("choice, expected, parallel", TOOL_CHOICES)
def test_tools_and_tool_choice(choice: Any, expected: Any, parallel: Any) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER]}
    if choice is not None:
        fields["tool_choice"] = choice
    out = convert(**fields)
    assert out["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "parameters": WEATHER["input_schema"], "description": "Weather"}}]
    assert out.get("tool_choice") == expected
    assert out.get("parallel_tool_calls") == parallel


def test_b29_long_tool_names_truncated_and_restored() -> None:
    long = "mcp__server__" + "x" * 87
    assert len(long) == 100
    data = {
        **BASE,
        "tools": [{"name": long, "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "tool", "name": long},
        "messages": [{"role": "user", "content": "go"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": long, "input": {}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}]}],
    }
    converted = to_openai(data, model="m")
    body = orjson.loads(converted.body)
    short = body["tools"][0]["function"]["name"]
    assert len(short) == 64 and short == tool_name(long, {})
    assert body["tool_choice"]["function"]["name"] == short
    assert body["messages"][1]["tool_calls"][0]["function"]["name"] == short
    assert converted.tool_names == {short: long}
    answer = completion(message={"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": short, "arguments": "{}"}}]}, finish="tool_calls")
    message = Message.model_validate_json(to_anthropic_answer(answer, model="c", tool_names=converted.tool_names).body)
    assert message.content[0].type == "tool_use" and message.content[0].name == long


REFUSED = [
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
    ({"messages": [{"role": "user", "content": [{"type": "search_result", "source": "s"}]}]}, "messages.0.content.0.type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages.0.content.0.source"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "https://x"}}]}]},
     "messages.0.content.0.source"),
    ({"tools": [{"type": "mystery_tool", "name": "m"}]}, "tools.0.type"),
    ({"output_config": {"format": {"type": "grammar"}}}, "output_config.format"),
    ({"system": [{"type": "image"}]}, "system.0"),
    ({"tool_choice": {"type": "sometimes"}, "tools": [WEATHER]}, "tool_choice.type"),
]


@pytest.mark.parametrize("fields, param", REFUSED)
def test_unexpressible_is_refused(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(GatewayError) as caught:
        to_openai({**BASE, **fields}, model="m")
    assert (caught.value.status, caught.value.type, caught.value.param) == (400, "invalid_request_error", param)


INVALID = [
    ({"model": None}, "model", "missing_field"),
    ({"model": ""}, "model", "invalid_value"),
    ({"max_tokens": None}, "max_tokens", "missing_field"),
    ({"max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"max_tokens": True}, "max_tokens", "invalid_value"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"text": "untyped"}]}]}, "messages.0.content", "invalid_value"),
    ({"temperature": 1.5}, "temperature", "invalid_value"),
    ({"stop_sequences": "END"}, "stop_sequences", "invalid_value"),
    ({"stream": "yes"}, "stream", "invalid_value"),
]


@pytest.mark.parametrize("fields, param, code", INVALID)
def test_validate_messages(fields: dict[str, Any], param: str, code: str) -> None:
    data = {k: v for k, v in {**BASE, **fields}.items() if v is not None}
    with pytest.raises(GatewayError) as caught:
        validate_messages(data)
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, param, code)


def completion(*, message: dict[str, Any], finish: Any = "stop", usage: Any = None, **choice: Any) -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "gpt-x",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    })


ANSWERS = [
    ({"role": "assistant", "content": "hello"}, "stop", [{"type": "text", "text": "hello"}], "end_turn"),
    ({"role": "assistant", "content": "cut"}, "length", [{"type": "text", "text": "cut"}], "max_tokens"),
    ({"role": "assistant", "content": ""}, "content_filter", [], "refusal"),
    ({"role": "assistant", "content": None}, None, [], "end_turn"),
    ({"role": "assistant", "content": "x"}, "weird", [{"type": "text", "text": "x"}], "end_turn"),
    ({"role": "assistant", "content": "a", "reasoning_content": "think"}, "stop",
     [{"type": "thinking", "thinking": "think", "signature": ""}, {"type": "text", "text": "a"}], "end_turn"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}},
        {"id": "functions.Bash:0", "type": "function", "function": {"name": "g", "arguments": '{"c":"Par'}},
        {"type": "function", "function": {"name": "h", "arguments": ""}}]}, "tool_calls",
     [{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
      {"type": "tool_use", "id": "functions_Bash_0_", "name": "g", "input": {}},
      {"type": "tool_use", "id": "toolu_chatcmpl-abc_2", "name": "h", "input": {}}], "tool_use"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, "stop",
     [{"type": "tool_use", "id": "c", "name": "f", "input": {}}], "tool_use"),
]


@pytest.mark.parametrize("message, finish, content, stop", ANSWERS)
def test_answer_mapping(message: dict[str, Any], finish: Any, content: list[Any], stop: str) -> None:
    answer = to_anthropic_answer(completion(message=message, finish=finish), model="claude-sonnet-4-6", tool_names={})
    out = orjson.loads(answer.body)
    for block in out["content"]:
        if block["type"] == "tool_use" and block["id"].startswith("functions_Bash_0_"):
            block["id"] = "functions_Bash_0_"  # the hash suffix is sanitized_tool_id's
    assert out["content"] == content and out["stop_reason"] == stop
    assert out["model"] == "claude-sonnet-4-6" and out["id"] == "msg_chatcmpl-abc"
    Message.model_validate_json(answer.body)


def test_stop_sequence_when_the_upstream_names_it() -> None:
    body = completion(message={"role": "assistant", "content": "a"}, stop_reason="END")
    out = orjson.loads(to_anthropic_answer(body, model="c", tool_names={}, stop_sequences=("END",)).body)
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "END")


def test_b25_cached_tokens_are_disjoint() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 7, "total_tokens": 1007,
             "prompt_tokens_details": {"cached_tokens": 800}}
    answer = to_anthropic_answer(completion(message={"role": "assistant", "content": "x"}, usage=usage), model="c", tool_names={})
    message = Message.model_validate_json(answer.body)
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (200, 800, 7)
    assert message.usage.cache_creation_input_tokens == 0
    assert answer.usage == usage


@pytest.mark.parametrize("body", [b"[]", b'{"choices":[]}', b'{"choices":[{"message":"x"}]}', b"not json",
                                  b'{"choices":[{"message":{"tool_calls":[{"function":{}}]}}]}'])
def test_malformed_answer_is_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        to_anthropic_answer(body, model="c", tool_names={})


def test_b26_estimate_counts_system_and_tools() -> None:
    bare = estimate_tokens(BASE)
    assert bare > 0
    with_tools = estimate_tokens({**BASE, "system": "s" * 350, "tools": [WEATHER] * 10})
    assert with_tools >= bare + 100 + len(orjson.dumps([WEATHER] * 10)) // 4
    assert estimate_tokens({}) == 0


def test_estimate_counts_images_by_figure_not_bytes() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 1_000_000}}
    estimate = estimate_tokens({**BASE, "messages": [{"role": "user", "content": [image]}]})
    assert 1600 <= estimate < 2000
