"""from_anthropic on Anthropic answers: one choice, content and tool calls in order, reasoning,
only OpenAI's finish reasons, usage folded as OpenAI counts it (reference §2, §8)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import anthropic.types
import orjson
import pytest
from openai.types.chat import ChatCompletion

from proxy.providers.anthropic_answer import from_anthropic

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"


def message(content: list[dict[str, Any]], stop_reason: Any = "end_turn", **usage: int) -> bytes:
    return orjson.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
        "stop_reason": stop_reason, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    })


def convert(body: bytes, **options: Any) -> dict[str, Any]:
    answer = from_anthropic(body, created=1700000000, **options)
    ChatCompletion.model_validate_json(answer.body)  # the openai SDK's own type accepts it
    parsed: dict[str, Any] = orjson.loads(answer.body)
    assert len(parsed["choices"]) == 1 and parsed["choices"][0]["index"] == 0
    return parsed


TEXT = {"type": "text", "text": "Hello"}
TOOL_A = {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}}
TOOL_B = {"type": "tool_use", "id": "toolu_B", "name": "now", "input": {}}
THINK = {"type": "thinking", "thinking": "Hmm.", "signature": "sig1"}
REDACTED = {"type": "redacted_thinking", "data": "EmwK"}

CONTENT = {
    "one text block": ([TEXT], {"role": "assistant", "content": "Hello"}),
    "every text block, joined in order": ([TEXT, {"type": "text", "text": ", world"}],
                                         {"role": "assistant", "content": "Hello, world"}),
    "no content at all: an empty string": ([], {"role": "assistant", "content": ""}),
    "tools only: content null, calls in order": ([TOOL_A, TOOL_B], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "toolu_A", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "toolu_B", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}),
    "thinking: reasoning_content and signed thinking_blocks": ([THINK, REDACTED, TEXT], {
        "role": "assistant", "content": "Hello", "reasoning_content": "Hmm.", "thinking_blocks": [THINK, REDACTED]}),
    "blocks with no OpenAI form are dropped": ([{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}, TEXT],
                                                {"role": "assistant", "content": "Hello"}),
}


@pytest.mark.parametrize(("content", "expected"), CONTENT.values(), ids=CONTENT.keys())
def test_content_maps_to_one_assistant_message(content: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    out = convert(message(content))
    assert out["choices"][0]["message"] == expected
    assert (out["id"], out["object"], out["created"], out["model"]) == ("msg_1", "chat.completion", 1700000000, "claude-x")


def test_dropped_blocks_are_named_for_their_metric() -> None:
    answer = from_anthropic(message([{"type": "web_search_tool_result", "tool_use_id": "s", "content": []}]), created=1)
    assert answer.dropped_blocks == ("web_search_tool_result",)


FINISH = {
    "end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
    "pause_turn": "stop", "refusal": "content_filter", "model_context_window_exceeded": "length",
}


def test_b9_every_stop_reason_the_sdk_knows_maps_into_openai_values() -> None:
    known = get_args(anthropic.types.StopReason)
    assert set(known) <= set(FINISH), "the SDK knows a stop_reason this table does not"
    for stop_reason in known:
        answer = from_anthropic(message([TEXT, TOOL_A], stop_reason), created=1)
        assert orjson.loads(answer.body)["choices"][0]["finish_reason"] == FINISH[stop_reason]
        assert answer.unknown == ()


@pytest.mark.parametrize(("stop_reason", "label"), [("brand_new", "brand_new"), (None, "null"), (7, "invalid"), ("x" * 100, "x" * 64)])
def test_b9_an_unknown_stop_reason_is_stop_and_recorded(stop_reason: Any, label: str) -> None:
    answer = from_anthropic(message([TEXT], stop_reason), created=1)
    assert orjson.loads(answer.body)["choices"][0]["finish_reason"] == "stop"
    assert answer.unknown == (("stop_reason", label),)


USAGE = {
    "plain": ({}, (10, 5, 0, 0)),
    "cache read": ({"cache_read_input_tokens": 1000}, (1010, 5, 1000, 0)),
    "cache read and write": ({"cache_read_input_tokens": 1000, "cache_creation_input_tokens": 300}, (1310, 5, 1000, 300)),
    "null counters": ({"cache_read_input_tokens": None, "cache_creation_input_tokens": None}, (10, 5, 0, 0)),
}


@pytest.mark.parametrize(("extra", "expected"), USAGE.values(), ids=USAGE.keys())
def test_b4_b5_usage_folds_cache_counters_into_prompt_tokens(extra: dict[str, Any], expected: tuple[int, ...]) -> None:
    answer = from_anthropic(message([TEXT], **extra), created=1)
    usage = answer.usage
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"],
            usage["prompt_tokens_details"]["cache_write_tokens"]) == expected
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]  # B5
    assert orjson.loads(answer.body)["usage"] == usage


def test_tool_use_without_a_tool_call_finishes_with_stop() -> None:
    assert convert(message([TEXT], "tool_use"))["choices"][0]["finish_reason"] == "stop"


def test_thinking_tokens_become_reasoning_tokens_when_reported() -> None:
    body = orjson.loads(message([TEXT]))
    body["usage"]["output_tokens_details"] = {"thinking_tokens": 3}
    assert from_anthropic(orjson.dumps(body), created=1).usage["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_json_mode_unwraps_the_forced_tool_into_content() -> None:
    tool = {"type": "tool_use", "id": "t", "name": "json_tool_call", "input": {"a": [1, 2]}}
    out = convert(message([tool], "tool_use"), json_mode=True)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": '{"a":[1,2]}'}
    assert out["choices"][0]["finish_reason"] == "stop"


def test_the_recorded_answer_converts() -> None:
    out = convert((FIXTURES / "tools_thinking.json").read_bytes())
    reply = out["choices"][0]["message"]
    assert [call["function"]["name"] for call in reply["tool_calls"]] == ["get_weather", "get_time"]
    assert reply["content"] == "Let me check both." and reply["reasoning_content"].startswith("The user wants")
    assert out["usage"]["prompt_tokens"] == 472 + 2048 + 100


MALFORMED = {
    "not JSON": b"<html>",
    "not an object": b"[]",
    "an error body": b'{"type":"error","error":{"type":"api_error","message":"x"}}',
    "no usage": orjson.dumps({"type": "message", "id": "m", "model": "x", "content": []}),
    "content not a list": orjson.dumps({"type": "message", "id": "m", "model": "x", "content": "hi", "usage": {}}),
    "no id": orjson.dumps({"type": "message", "model": "x", "content": [], "usage": {}}),
    "a text block without text": message([{"type": "text"}]),
    "a tool_use without id": message([{"type": "tool_use", "name": "n", "input": {}}]),
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_answer_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        from_anthropic(body, created=1)
