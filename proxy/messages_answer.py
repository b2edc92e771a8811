"""OpenAI `chat.completion` → Anthropic `message` (reference §7.5), and the stop-reason, usage and
tool-block mappings the reverse stream shares.

Owns what an Anthropic client sees of an OpenAI answer: the requested model name, thinking, text
and tool_use blocks (never an empty text block), Anthropic's stop reasons and disjoint input
counters. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from .caps import DEFAULT_CAPS
from .providers.anthropic_messages import Build, sanitized_tool_id

STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


@dataclass(frozen=True, slots=True)
class MessagesAnswer:
    body: bytes  # the Anthropic message JSON for the client
    usage: dict[str, Any]  # OpenAI-shaped, as the upstream gave it: what settlement reads


def stop_reason(finish: Any, *, tool_use: bool) -> str:
    """Anthropic's stop_reason for OpenAI's finish_reason; unknown or null is end_turn."""
    mapped = STOP_REASONS.get(finish, "end_turn") if type(finish) is str else "end_turn"
    return "tool_use" if tool_use and mapped == "end_turn" else mapped


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def anthropic_usage(usage: Mapping[str, Any] | None) -> dict[str, int]:
    """Anthropic's disjoint counters: OpenAI's prompt_tokens includes the cached ones (B25)."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details")
    details = details if type(details) is dict else {}
    read = _count(details.get("cached_tokens"))
    write = _count(details.get("cache_write_tokens")) or _count(details.get("cache_creation_tokens"))
    return {
        "input_tokens": max(_count(usage.get("prompt_tokens")) - read - write, 0),
        "output_tokens": _count(usage.get("completion_tokens")),
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": write,
    }


def tool_use_id(raw: Any, fallback: str) -> str:
    """Anthropic's id pattern `^[a-zA-Z0-9_-]+$`; `fallback` for a call that came without one."""
    build = Build(DEFAULT_CAPS)
    return sanitized_tool_id(raw, build) or sanitized_tool_id(fallback, build) or "toolu_gateway"


def tool_use_block(call_id: Any, name: str, arguments: Any, *, fallback_id: str) -> dict[str, Any]:
    """A tool_use block with parsed input; arguments that are not a JSON object become {}."""
    value: Any = None
    if type(arguments) is str and arguments:
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            value = None
    return {
        "type": "tool_use",
        "id": tool_use_id(call_id, fallback_id),
        "name": name,
        "input": value if type(value) is dict else {},
    }


def message_id(raw: Any) -> str:
    return f"msg_{raw}" if type(raw) is str and raw else "msg_gateway"


def to_anthropic_answer(
    body: bytes, *, model: str, tool_names: Mapping[str, str], stop_sequences: tuple[str, ...] = ()
) -> MessagesAnswer:
    """ValueError when `body` is not a chat.completion (the caller's bad_upstream_response).
    `model` is the client's requested name; `tool_names` maps truncated names back (B29)."""
    answer = orjson.loads(body)
    if type(answer) is not dict or type(answer.get("choices")) is not list or not answer["choices"]:
        raise ValueError("not a chat.completion with choices")
    choice = answer["choices"][0]
    message = choice.get("message") if type(choice) is dict else None
    if type(message) is not dict:
        raise ValueError("a chat.completion choice without a message")
    mid = message_id(answer.get("id"))
    content = _blocks(message, tool_names, mid)
    raw_usage = answer.get("usage")
    usage: dict[str, Any] = raw_usage if type(raw_usage) is dict else {}
    reason = stop_reason(choice.get("finish_reason"), tool_use=any(b["type"] == "tool_use" for b in content))
    matched = _matched_stop(choice, stop_sequences)
    out = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "stop_sequence" if matched is not None and reason == "end_turn" else reason,
        "stop_sequence": matched if reason == "end_turn" else None,
        "usage": anthropic_usage(usage),
    }
    return MessagesAnswer(body=orjson.dumps(out), usage=usage)


def _matched_stop(choice: dict[str, Any], stop_sequences: tuple[str, ...]) -> str | None:
    """The stop sequence hit, when the upstream names it (vLLM's `stop_reason`); OpenAI does not."""
    matched = choice.get("stop_reason")
    return matched if type(matched) is str and matched in stop_sequences else None


def _blocks(message: dict[str, Any], tool_names: Mapping[str, str], mid: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if type(reasoning) is str and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if type(text) is str and text:
        blocks.append({"type": "text", "text": text})
    elif text is not None and type(text) is not str:
        raise ValueError("a message content that is not a string")
    calls = message.get("tool_calls") or []
    if type(calls) is not list:
        raise ValueError("tool_calls that are not an array")
    for k, call in enumerate(calls):
        function = call.get("function") if type(call) is dict else None
        if type(function) is not dict or type(function.get("name")) is not str:
            raise ValueError("a tool call without a function name")
        name = tool_names.get(function["name"], function["name"])
        blocks.append(tool_use_block(call.get("id"), name, function.get("arguments"), fallback_id=f"toolu_{mid[4:]}_{k}"))
    return blocks
