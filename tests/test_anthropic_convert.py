"""to_anthropic: one row per mapping of reference §1.2–§1.4 (top-level fields, messages, content
parts), the worked example of §1.8, and the §8 regressions B10–B14, B19 of that direction.
Tools, response_format and reasoning are test_anthropic_tools'."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson
import pytest

from proxy.caps import Caps
from proxy.errors import GatewayError
from proxy.providers.anthropic_request import Converted, to_anthropic

USER = {"role": "user", "content": "Hi"}
BASE: dict[str, Any] = {"model": "claude", "messages": [USER]}
ANTHROPIC_FIELDS = {
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream", "temperature",
    "top_p", "top_k", "tools", "tool_choice", "thinking", "output_config",
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
WEATHER_AN = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def converted(changes: dict[str, Any], caps: Caps = Caps()) -> Converted:
    return to_anthropic({**BASE, **changes}, model="claude-up", caps=caps, default_max_tokens=4096)


def convert(changes: dict[str, Any], caps: Caps = Caps()) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(converted(changes, caps).body)
    assert set(body) <= ANTHROPIC_FIELDS, "a field Anthropic does not document reached the body"
    return body


def refused(changes: dict[str, Any], caps: Caps = Caps()) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        converted(changes, caps)
    assert caught.value.status == 400 and caught.value.type == "invalid_request_error"
    return caught.value


def call(call_id: str, name: str = "get_weather", arguments: str = '{"city":"Paris"}') -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_use(call_id: str, name: str = "get_weather", tool_input: Any = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": {"city": "Paris"} if tool_input is None else tool_input}


def user(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def text(value: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": value, **extra}


EPHEMERAL = {"type": "ephemeral"}
TOP_LEVEL = {
    "max_tokens absent: the model's default": ({}, {"max_tokens": 4096}),
    "max_completion_tokens wins over max_tokens": ({"max_completion_tokens": 100, "max_tokens": 50}, {"max_tokens": 100}),
    "temperature passes": ({"temperature": 0.3}, {"temperature": 0.3}),
    "temperature capped at 1": ({"temperature": 1.4}, {"temperature": 1.0}),
    "top_p and top_k pass": ({"top_p": 0.9, "top_k": 40}, {"top_p": 0.9, "top_k": 40}),
    "stop string → list": ({"stop": "END"}, {"stop_sequences": ["END"]}),
    "whitespace stop sequences dropped": ({"stop": ["END", "\n\n", " "]}, {"stop_sequences": ["END"]}),
    "only whitespace stops: none sent": ({"stop": ["\n"]}, {"stop_sequences": None}),
    "stream": ({"stream": True, "stream_options": {"include_usage": True}}, {"stream": True}),
    "user → metadata.user_id": ({"user": "u-42"}, {"metadata": {"user_id": "u-42"}}),
    "safety_identifier wins over user": ({"user": "u-1", "safety_identifier": "s-1"}, {"metadata": {"user_id": "s-1"}}),
    "an e-mail is not sent as user_id": ({"user": "jane@example.com"}, {"metadata": None}),
    "a phone number is not sent as user_id": ({"user": "+44 20 7946 0958"}, {"metadata": None}),
    "a numeric id is": ({"user": "123456789"}, {"metadata": {"user_id": "123456789"}}),
    "OpenAI metadata, request_id and unknown fields never reach it": (
        {"metadata": {"a": "b"}, "request_id": "r1", "frobnicate": 1, "stream_options": {"include_usage": False}}, {"metadata": None}),
    "null means absent": ({"temperature": None, "stop": None, "tools": None, "n": None, "reasoning_effort": None}, {"temperature": None}),
}


@pytest.mark.parametrize(("changes", "expected"), TOP_LEVEL.values(), ids=TOP_LEVEL.keys())
def test_top_level_fields(changes: dict[str, Any], expected: dict[str, Any]) -> None:
    body = convert(changes)
    assert body["model"] == "claude-up" and body["messages"] == [user(text("Hi"))]
    for name, value in expected.items():
        assert body.get(name) == value, name


def test_max_tokens_is_clamped_to_the_model_ceiling() -> None:
    assert convert({"max_tokens": 100_000}, Caps(max_output_tokens=64000))["max_tokens"] == 64000
    assert converted({"max_tokens": 100_000}, Caps(max_output_tokens=64000)).repairs == ("clamped_max_tokens",)
    assert to_anthropic(BASE, model="m", caps=Caps(max_output_tokens=2048), default_max_tokens=4096).body.find(b'"max_tokens":2048') > 0


def test_params_anthropic_lacks_are_dropped_and_named() -> None:
    dropped = {"presence_penalty": 0.5, "frequency_penalty": 0.1, "logit_bias": {"1": 2}, "seed": 7, "service_tier": "auto",
               "store": True, "prediction": {"type": "content"}, "prompt_cache_key": "k", "verbosity": "low", "metadata": {"a": "b"}}
    result = converted(dropped)
    assert set(result.dropped) == set(dropped)
    assert not set(orjson.loads(result.body)) & set(dropped) - {"metadata"}
    assert (result.stream, result.include_usage) == (False, False)
    streamed = converted({"stream": True, "stream_options": {"include_usage": True}})
    assert (streamed.stream, streamed.include_usage) == (True, True)


UNSUPPORTED = {
    "n > 1": ({"n": 2}, "n"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "top_logprobs": ({"top_logprobs": 3}, "top_logprobs"),
    "audio output via modalities": ({"modalities": ["text", "audio"]}, "modalities"),
    "audio output": ({"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
    "web_search_options": ({"web_search_options": {}}, "web_search_options"),
    "a custom tool": ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    "input_audio": ({"messages": [user({"type": "input_audio", "input_audio": {"data": "AA", "format": "wav"}})]}, "messages[0].content[0]"),
    "a file id": ({"messages": [user({"type": "file", "file": {"file_id": "file-1"}})]}, "messages[0].content[0].file.file_id"),
    "reasoning on a model that cannot think": ({"reasoning_effort": "high", "_caps": Caps(thinking="none")}, "reasoning_effort"),
    "forced tool_choice the model refuses": ({"tools": [WEATHER], "tool_choice": "required", "_caps": Caps(forced_tool_choice=False)}, "tool_choice"),
    "prefill the model refuses": ({"messages": [USER, {"role": "assistant", "content": "Sure"}], "_caps": Caps(prefill=False)}, "messages"),
}


@pytest.mark.parametrize(("changes", "param"), UNSUPPORTED.values(), ids=UNSUPPORTED.keys())
def test_b18_b19_what_anthropic_cannot_express_is_refused_before_any_attempt(changes: dict[str, Any], param: str) -> None:
    caps = changes.pop("_caps", Caps())
    error = refused(changes, caps)
    assert (error.code, error.param) == ("unsupported_field", param)


def test_b19_the_n_message_names_the_provider() -> None:
    assert refused({"n": 3}).message == "n>1 is not supported by provider anthropic."


MESSAGES = {
    "system and developer hoisted from anywhere, in order": (
        [{"role": "system", "content": "A"}, USER, {"role": "developer", "content": [text("B"), text("C")]}, {"role": "system", "content": ""}],
        [text("A"), text("B"), text("C")], [user(text("Hi"))]),
    "cache_control kept on system messages and parts": (
        [{"role": "system", "content": "A", "cache_control": EPHEMERAL}, {"role": "system", "content": [text("B", cache_control=EPHEMERAL)]}, USER],
        [text("A", cache_control=EPHEMERAL), text("B", cache_control=EPHEMERAL)], [user(text("Hi"))]),
    "cache_control on a user message goes on its last block": (
        [{"role": "user", "content": [text("a"), text("b")], "cache_control": EPHEMERAL}],
        None, [user(text("a"), text("b", cache_control=EPHEMERAL))]),
    "cache_control on a tool message goes on its tool_result; null types are absent": (
        [USER, {"role": "assistant", "tool_calls": [{**call("call_1"), "type": None}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "18C", "cache_control": EPHEMERAL}],
        None, [user(text("Hi")), {"role": "assistant", "content": [tool_use("call_1")]},
               user({"type": "tool_result", "tool_use_id": "call_1", "content": "18C", "cache_control": EPHEMERAL})]),
    "consecutive user turns merged": (
        [USER, {"role": "user", "content": [text("again")]}], None, [user(text("Hi"), text("again"))]),
    "refusal parts and a refusal become text": (
        [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}, USER, {"role": "assistant", "content": None, "refusal": "Nope."}, USER],
        None, [user(text("Hi")), {"role": "assistant", "content": [text("No.")]}, user(text("Hi")),
               {"role": "assistant", "content": [text("Nope.")]}, user(text("Hi"))]),
    "a prefill loses its trailing whitespace": (
        [USER, {"role": "assistant", "content": "The answer is "}], None,
        [user(text("Hi")), {"role": "assistant", "content": [text("The answer is")]}]),
    "a whitespace-only prefill is dropped": (
        [USER, {"role": "assistant", "content": "  "}], None, [user(text("Hi"))]),
    "legacy function_call and function messages pair": (
        [USER, {"role": "assistant", "content": None, "function_call": {"name": "now", "arguments": ""}}, {"role": "function", "name": "now", "content": "noon"}],
        None, [user(text("Hi")), {"role": "assistant", "content": [tool_use("call_function_1", "now", {})]},
               user({"type": "tool_result", "tool_use_id": "call_function_1", "content": "noon"})]),
}


@pytest.mark.parametrize(("messages", "system", "turns"), MESSAGES.values(), ids=MESSAGES.keys())
def test_messages(messages: list[dict[str, Any]], system: list[dict[str, Any]] | None, turns: list[dict[str, Any]]) -> None:
    body = convert({"messages": messages})
    assert body.get("system") == system
    assert body["messages"] == turns


def test_b10_empty_text_is_never_sent() -> None:
    body = convert({"messages": [
        {"role": "user", "content": [text(""), text("real")]},
        {"role": "assistant", "content": "", "tool_calls": [call("call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "content": ""},
        {"role": "user", "content": ""},
    ]})
    assert body["messages"] == [
        user(text("real")),
        {"role": "assistant", "content": [tool_use("call_1")]},
        user({"type": "tool_result", "tool_use_id": "call_1"}),
    ]
    error = refused({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": ""}, {"role": "user", "content": [text("")]}]})
    assert (error.code, error.param) == ("invalid_value", "messages")


def test_b11_tool_results_come_first_and_merge_into_one_user_turn() -> None:
    body = convert({"messages": [
        USER,
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("call_a"), call("call_b")]},
        {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
        {"role": "user", "content": "and hurry"},
        {"role": "tool", "tool_call_id": "call_b", "content": [text("21C"), text("")]},
    ]})
    assert body["messages"][-1] == user(
        {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
        {"type": "tool_result", "tool_use_id": "call_b", "content": [text("21C")]},
        text("and hurry"),
    )
    assert body["messages"][1] == {"role": "assistant", "content": [text("Checking."), tool_use("call_a"), tool_use("call_b")]}


PAIRING = {
    "a call without a tool message": (
        [USER, {"role": "assistant", "tool_calls": [call("call_a"), call("call_b")]}, {"role": "tool", "tool_call_id": "call_a", "content": "x"}],
        "messages[1].tool_calls", "tool call call_b has no tool message."),
    "a call at the end": ([USER, {"role": "assistant", "tool_calls": [call("call_a")]}], "messages[1].tool_calls", None),
    "an orphan tool message": (
        [USER, {"role": "assistant", "tool_calls": [call("call_a")]}, {"role": "tool", "tool_call_id": "call_a", "content": "x"},
         {"role": "tool", "tool_call_id": "call_zz", "content": "y"}], "messages[3].tool_call_id", None),
    "a tool message with no call before it": ([USER, {"role": "tool", "tool_call_id": "call_a", "content": "x"}], "messages[1].tool_call_id", None),
    "an assistant first": ([{"role": "system", "content": "S"}, {"role": "assistant", "content": "Hello"}, USER], "messages[1].role", None),
    "an empty tool call id": ([USER, {"role": "assistant", "tool_calls": [call("")]}], "messages[1].tool_calls[0].id", None),
    "a function message without a function_call": ([USER, {"role": "function", "name": "f", "content": "x"}], "messages[1].role", None),
    "content that is not a string or parts": ([{"role": "user", "content": 5}], "messages[0].content", None),
    "a part that is not an object": ([{"role": "user", "content": ["hi"]}], "messages[0].content[0]", None),
}


@pytest.mark.parametrize(("messages", "param", "message"), PAIRING.values(), ids=PAIRING.keys())
def test_malformed_conversations_are_refused_with_the_clients_own_indices(
    messages: list[dict[str, Any]], param: str, message: str | None
) -> None:
    error = refused({"messages": messages})
    assert (error.code, error.param) == ("invalid_value", param)
    assert message is None or error.message == message


def test_b12_invalid_tool_arguments_in_history_become_an_empty_input() -> None:
    result = converted({"messages": [
        USER, {"role": "assistant", "tool_calls": [call("call_a", arguments='{"city":"Par'), call("call_b", arguments="[1]"), call("call_c", arguments="")]},
        *({"role": "tool", "tool_call_id": f"call_{x}", "content": "ok"} for x in "abc"),
    ]})
    inputs = [block["input"] for block in orjson.loads(result.body)["messages"][1]["content"]]
    assert inputs == [{}, {}, {}] and result.repairs == ("invalid_tool_arguments",)


def test_b13_foreign_tool_ids_are_sanitized_the_same_on_both_sides() -> None:
    raw = "functions.get_weather:1"
    result = converted({"messages": [USER, {"role": "assistant", "tool_calls": [call(raw)]}, {"role": "tool", "tool_call_id": raw, "content": "18C"}]})
    body = orjson.loads(result.body)
    sent = body["messages"][1]["content"][0]["id"]
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", sent)
    assert sent == f"functions_get_weather_1_{hashlib.sha256(raw.encode()).hexdigest()[:8]}"
    assert body["messages"][2]["content"][0]["tool_use_id"] == sent
    assert result.repairs == ("sanitized_tool_id",)


PNG = "iVBORw0KGgo="
PARTS = {
    "data URL → base64 image": ({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}),
    "B14: data URL with parameters": ({"type": "image_url", "image_url": {"url": f"data:IMAGE/JPEG;charset=utf-8;name=a.jpg;base64,{PNG}"}},
                                      {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": PNG}}),
    "B14: https URL handed on, never fetched": ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "high"}},
                                                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}}),
    "a PDF data URL → document": ({"type": "image_url", "image_url": {"url": f"data:application/pdf;base64,{PNG}"}},
                                  {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PNG}}),
    "a PDF file part → document": ({"type": "file", "file": {"file_data": f"data:application/pdf;base64,{PNG}", "filename": "a.pdf"}},
                                   {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": PNG}}),
    "cache_control kept on a part": ({"type": "image_url", "image_url": {"url": "https://e.com/a.png"}, "cache_control": EPHEMERAL},
                                     {"type": "image", "source": {"type": "url", "url": "https://e.com/a.png"}, "cache_control": EPHEMERAL}),
}


@pytest.mark.parametrize(("part", "block"), PARTS.values(), ids=PARTS.keys())
def test_content_parts(part: dict[str, Any], block: dict[str, Any]) -> None:
    assert convert({"messages": [user(text("Look:"), part)]})["messages"] == [user(text("Look:"), block)]


BAD_PARTS = {
    "B14: an unsupported media type": {"type": "image_url", "image_url": {"url": f"data:image/tiff;base64,{PNG}"}},
    "a data URL that is not base64": {"type": "image_url", "image_url": {"url": "data:image/png,rawbytes"}},
    "a data URL without data": {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
    "a file: URL": {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
    "a file that is not a PDF": {"type": "file", "file": {"file_data": f"data:text/plain;base64,{PNG}"}},
}


@pytest.mark.parametrize("part", BAD_PARTS.values(), ids=BAD_PARTS.keys())
def test_bad_content_parts_are_refused_naming_the_part(part: dict[str, Any]) -> None:
    error = refused({"messages": [user(text("Look:"), part)]})
    assert error.code == "invalid_value" and error.param is not None
    assert error.param.startswith("messages[0].content[1].")


def test_the_worked_example_of_reference_1_8() -> None:
    data = {"model": "claude-sonnet", "max_tokens": 512, "temperature": 1.4, "stop": ["END", "\n\n"], "parallel_tool_calls": False,
            "messages": [
                {"role": "system", "content": "Be terse."},
                user(text("Weather in Paris and Rome?"), {"type": "image_url", "image_url": {"url": "data:image/png;charset=utf-8;base64,iVBOR..."}}),
                {"role": "assistant", "content": "", "tool_calls": [call("call_a"), call("functions.get_weather:1", arguments='{"city":"Rome"')]},
                {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
                {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": ""},
                {"role": "user", "content": "Thanks. Which is warmer?"}],
            "tools": [WEATHER]}
    result = to_anthropic(data, model="claude-sonnet-4-5-20250929", caps=Caps(), default_max_tokens=4096)
    rome = f"functions_get_weather_1_{hashlib.sha256(b'functions.get_weather:1').hexdigest()[:8]}"
    assert orjson.loads(result.body) == {
        "model": "claude-sonnet-4-5-20250929", "max_tokens": 512, "temperature": 1.0, "stop_sequences": ["END"],
        "system": [text("Be terse.")],
        "messages": [
            user(text("Weather in Paris and Rome?"), {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR..."}}),
            {"role": "assistant", "content": [tool_use("call_a"), tool_use(rome, tool_input={})]},
            user({"type": "tool_result", "tool_use_id": "call_a", "content": "18C"}, {"type": "tool_result", "tool_use_id": rome},
                 text("Thanks. Which is warmer?"))],
        "tools": [WEATHER_AN],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
    }
    assert set(result.repairs) == {"sanitized_tool_id", "invalid_tool_arguments", "clamped_temperature", "whitespace_stop_sequence"}
