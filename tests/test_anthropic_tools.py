"""to_anthropic: tools, tool_choice, parallel tool calls, response_format and reasoning_effort
(reference §1.5–§1.7), and the §8 regressions B15–B18."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.caps import Caps

from .test_anthropic_convert import USER, WEATHER, WEATHER_AN, call, convert, converted, refused, tool_use

EPHEMERAL = {"type": "ephemeral"}


def test_b15_tool_definitions_keep_their_whole_schema() -> None:
    schema = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"}},
              "required": ["unit"], "additionalProperties": False, "$defs": {"x": {"type": "string"}}}
    tools = [
        {"type": "function", "function": {"name": "a", "description": "Does a", "parameters": schema, "strict": True}},
        {"type": None, "function": {"name": "b", "description": None, "parameters": None, "strict": None}},
        {"type": "function", "function": {"name": "c", "parameters": {"properties": {}}}, "cache_control": EPHEMERAL},
    ]
    assert convert({"tools": tools})["tools"] == [
        {"name": "a", "description": "Does a", "input_schema": schema, "strict": True},
        {"name": "b", "input_schema": {"type": "object", "properties": {}}},
        {"name": "c", "input_schema": {"type": "object", "properties": {}}, "cache_control": EPHEMERAL},
    ]


CHOICES = {
    "absent": ({}, None, ["get_weather", "now"]),
    "auto": ({"tool_choice": "auto"}, {"type": "auto"}, ["get_weather", "now"]),
    "none": ({"tool_choice": "none"}, {"type": "none"}, ["get_weather", "now"]),
    "required": ({"tool_choice": "required"}, {"type": "any"}, ["get_weather", "now"]),
    "a named function": ({"tool_choice": {"type": "function", "function": {"name": "now"}}}, {"type": "tool", "name": "now"}, ["get_weather", "now"]),
    "allowed_tools auto: only those sent": (
        {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "now"}}]}}},
        {"type": "auto"}, ["now"]),
    "allowed_tools required": (
        {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "now"}}]}}},
        {"type": "any"}, ["now"]),
    "allowed_tools naming none declared: all": (
        {"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "zz"}}]}}},
        {"type": "auto"}, ["get_weather", "now"]),
    "B16: parallel_tool_calls false without tool_choice": ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}, ["get_weather", "now"]),
    "B16: parallel_tool_calls false with required": (
        {"tool_choice": "required", "parallel_tool_calls": False}, {"type": "any", "disable_parallel_tool_use": True}, ["get_weather", "now"]),
    "parallel_tool_calls false with none: not set": ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}, ["get_weather", "now"]),
    "parallel_tool_calls true: Anthropic's default": ({"parallel_tool_calls": True}, None, ["get_weather", "now"]),
    "legacy functions and function_call": (
        {"tools": None, "functions": [WEATHER["function"], {"name": "now"}], "function_call": {"name": "now"}}, {"type": "tool", "name": "now"}, ["get_weather", "now"]),
}


@pytest.mark.parametrize(("changes", "choice", "names"), CHOICES.values(), ids=CHOICES.keys())
def test_tool_choice(changes: dict[str, Any], choice: dict[str, Any] | None, names: list[str]) -> None:
    body = convert({"tools": [WEATHER, {"type": "function", "function": {"name": "now"}}], **changes})
    assert body.get("tool_choice") == choice
    assert [tool["name"] for tool in body["tools"]] == names


def test_tool_choice_without_tools_is_not_sent() -> None:
    body = convert({"tool_choice": "required", "parallel_tool_calls": False})
    assert "tool_choice" not in body and "tools" not in body


SCHEMA = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {"type": "string"}}},
                                           "list": {"type": "array", "items": {"type": "object", "properties": {}}},
                                           "open": {"type": "object", "properties": {}, "additionalProperties": True}},
          "$defs": {"d": {"anyOf": [{"type": "object", "properties": {"b": {"type": "integer"}}}, {"type": "null"}]}}}
CLOSED = {"type": "object", "additionalProperties": False,
          "properties": {"properties": {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False},
                         "list": {"type": "array", "items": {"type": "object", "properties": {}, "additionalProperties": False}},
                         "open": {"type": "object", "properties": {}, "additionalProperties": True}},
          "$defs": {"d": {"anyOf": [{"type": "object", "properties": {"b": {"type": "integer"}}, "additionalProperties": False}, {"type": "null"}]}}}


def test_json_schema_becomes_structured_output_with_closed_objects() -> None:
    body = convert({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}})
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": CLOSED}}
    assert "tools" not in body and "tool_choice" not in body


@pytest.mark.parametrize(("fmt", "schema"), [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}, SCHEMA),
    ({"type": "json_object"}, {"type": "object", "additionalProperties": True, "properties": {}}),
], ids=["json_schema without structured outputs", "json_object"])
def test_response_format_emulated_with_a_forced_tool(fmt: dict[str, Any], schema: dict[str, Any]) -> None:
    result = converted({"response_format": fmt, "tools": [WEATHER]}, Caps(structured_outputs=False))
    body = orjson.loads(result.body)
    assert result.json_mode and "output_config" not in body
    assert body["tools"][0] == WEATHER_AN and body["tools"][1]["name"] == "json_tool_call"
    assert body["tools"][1]["input_schema"] == schema
    assert body["tool_choice"] == {"type": "tool", "name": "json_tool_call", "disable_parallel_tool_use": True}


@pytest.mark.parametrize(("changes", "caps"), [
    ({"reasoning_effort": "low"}, Caps(structured_outputs=False)),
    ({"tools": [WEATHER], "tool_choice": "required"}, Caps(structured_outputs=False)),
    ({}, Caps(structured_outputs=False, forced_tool_choice=False)),
], ids=["with thinking", "with a forced tool of the client's", "on a model refusing forced tools"])
def test_response_format_that_cannot_be_emulated_is_refused(changes: dict[str, Any], caps: Caps) -> None:
    error = refused({"response_format": {"type": "json_object"}, **changes}, caps)
    assert (error.code, error.param) == ("unsupported_field", "response_format")


def test_response_format_text_sends_nothing() -> None:
    assert "output_config" not in convert({"response_format": {"type": "text"}})


EFFORT = {"minimal": (1024, "low"), "low": (1024, "low"), "medium": (2048, "medium"), "high": (4096, "high"),
          "xhigh": (8192, "xhigh"), "max": (16384, "max")}


@pytest.mark.parametrize(("effort", "expected"), EFFORT.items(), ids=EFFORT.keys())
def test_reasoning_effort_becomes_thinking_by_caps(effort: str, expected: tuple[int, str]) -> None:
    budget, level = expected
    body = convert({"reasoning_effort": effort, "max_tokens": 32000})
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget} and "output_config" not in body
    body = convert({"reasoning_effort": effort, "max_tokens": 32000}, Caps(thinking="adaptive"))
    assert body["thinking"] == {"type": "adaptive"} and body["output_config"] == {"effort": level}


def test_reasoning_effort_none_or_absent_sends_no_thinking() -> None:
    for caps in (Caps(), Caps(thinking="adaptive"), Caps(thinking="none")):
        assert "thinking" not in convert({"reasoning_effort": "none"}, caps) and "thinking" not in convert({}, caps)


def test_the_budget_stays_below_max_tokens_and_a_too_small_max_tokens_is_refused() -> None:
    assert convert({"reasoning_effort": "high", "max_tokens": 3000})["thinking"]["budget_tokens"] == 2999
    assert (refused({"reasoning_effort": "low", "max_tokens": 1024}).param) == "max_tokens"
    assert (refused({"reasoning_effort": "low", "max_completion_tokens": 900}).param) == "max_completion_tokens"
    assert refused({"reasoning_effort": "sideways"}).param == "reasoning_effort"


def test_with_thinking_on_sampling_params_follow_its_rules() -> None:
    result = converted({"reasoning_effort": "low", "temperature": 0.5, "top_k": 5, "top_p": 0.97})
    body = orjson.loads(result.body)
    assert body["top_p"] == 0.97 and "temperature" not in body and "top_k" not in body
    assert set(result.dropped) == {"temperature", "top_k"}
    assert "top_p" not in convert({"reasoning_effort": "low", "top_p": 0.5})


def test_a_forced_tool_choice_wins_over_thinking() -> None:
    result = converted({"reasoning_effort": "high", "tools": [WEATHER], "tool_choice": "required"})
    assert "thinking" not in orjson.loads(result.body) and result.repairs == ("thinking_disabled_forced_tool_choice",)


def test_expose_reasoning_asks_for_summarized_thinking() -> None:
    assert convert({"reasoning_effort": "low"}, Caps(thinking="adaptive", expose_reasoning=True))["thinking"] == {
        "type": "adaptive", "display": "summarized"}


THINKING_BLOCK = {"type": "thinking", "thinking": "Let me think.", "signature": "sig"}
TOOL_HISTORY = [USER, {"role": "assistant", "content": None, "tool_calls": [call("call_a")]}, {"role": "tool", "tool_call_id": "call_a", "content": "18C"}]


def test_b17_thinking_is_not_enabled_over_tool_history_without_signed_thinking() -> None:
    result = converted({"reasoning_effort": "high", "messages": TOOL_HISTORY, "max_tokens": 8000})
    body = orjson.loads(result.body)
    assert "thinking" not in body and result.repairs == ("thinking_disabled_tool_history",)
    assert body["messages"][1] == {"role": "assistant", "content": [tool_use("call_a")]}


def test_b17_signed_thinking_blocks_sent_back_keep_thinking_on_and_lead_their_turn() -> None:
    history = [TOOL_HISTORY[0], {**TOOL_HISTORY[1], "thinking_blocks": [THINKING_BLOCK, {"type": "thinking", "thinking": "unsigned"}]}, TOOL_HISTORY[2]]
    body = convert({"reasoning_effort": "high", "messages": history, "max_tokens": 8000})
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 4096}
    assert body["messages"][1]["content"] == [THINKING_BLOCK, tool_use("call_a")]
    without = convert({"messages": history})  # thinking off: no thinking block may be sent
    assert without["messages"][1]["content"] == [tool_use("call_a")]


def test_b18_a_model_refusing_sampling_budget_thinking_and_prefill() -> None:
    caps = Caps(thinking="adaptive", sampling_params=False, prefill=False, max_output_tokens=128000)
    result = converted({"temperature": 0.2, "top_p": 0.9, "top_k": 3, "reasoning_effort": "medium"}, caps)
    body = orjson.loads(result.body)
    assert not {"temperature", "top_p", "top_k"} & set(body) and set(result.dropped) == {"temperature", "top_p", "top_k"}
    assert body["thinking"] == {"type": "adaptive"} and "budget_tokens" not in body["thinking"]
    assert refused({"messages": [USER, {"role": "assistant", "content": "Sure,"}]}, caps).code == "unsupported_field"
