"""Anthropic Messages answer → OpenAI `chat.completion` (reference §2), and the stop-reason and
usage mappings the stream converter shares.

Owns what the client sees of an Anthropic answer: one choice, only OpenAI's finish reasons, usage
folded the same way streamed or not. Pure: no I/O, no clock (the caller passes `created`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import orjson

JSON_TOOL = "json_tool_call"  # anthropic_request's response_format emulation
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "pause_turn": "stop",  # server tools only, which the converter never sends
    "refusal": "content_filter",
    "model_context_window_exceeded": "length",
}
MAX_LABEL = 64  # an upstream's unknown value becomes a metric label: keep it short


@dataclass(frozen=True, slots=True)
class Answer:
    body: bytes  # the OpenAI chat.completion JSON for the client
    usage: dict[str, Any]  # OpenAI-shaped, what settlement reads
    unknown: tuple[tuple[str, str], ...]  # (field, value) mapped to a default (unknown_values_total)
    dropped_blocks: tuple[str, ...] = ()  # content block types with no OpenAI form (dropped_blocks_total)


def label(value: Any) -> str:
    if value is None:
        return "null"
    return value[:MAX_LABEL] if type(value) is str else "invalid"


def finish_reason(stop_reason: Any, unknown: list[tuple[str, str]], *, called: bool) -> str:
    """OpenAI's finish_reason for Anthropic's stop_reason; an unknown one is "stop", recorded.
    "tool_calls" only when the client got a tool call (not the JSON tool of response_format)."""
    mapped = FINISH_REASONS.get(stop_reason) if type(stop_reason) is str else None
    if mapped is None:
        unknown.append(("stop_reason", label(stop_reason)))
        return "stop"
    return "stop" if mapped == "tool_calls" and not called else mapped


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def openai_usage(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Anthropic's three disjoint input counters fold into prompt_tokens, as OpenAI counts it."""
    read = _count(raw.get("cache_read_input_tokens"))
    write = _count(raw.get("cache_creation_input_tokens"))
    prompt = _count(raw.get("input_tokens")) + read + write
    completion = _count(raw.get("output_tokens"))
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
    }
    details = raw.get("output_tokens_details")
    if type(details) is dict and type(details.get("thinking_tokens")) is int:
        usage["completion_tokens_details"] = {"reasoning_tokens": _count(details["thinking_tokens"])}
    return usage


def from_anthropic(body: bytes, *, created: int, json_mode: bool = False) -> Answer:
    """ValueError when `body` is not an Anthropic message (the caller's bad_upstream_response)."""
    message = orjson.loads(body)
    if type(message) is not dict or message.get("type") != "message":
        raise ValueError("not an Anthropic message")
    content, raw_usage = message.get("content"), message.get("usage")
    if type(content) is not list or type(raw_usage) is not dict:
        raise ValueError("an Anthropic message without content or usage")
    if type(message.get("id")) is not str or type(message.get("model")) is not str:
        raise ValueError("an Anthropic message without id or model")
    reply, dropped = _reply(content, json_mode=json_mode)
    unknown: list[tuple[str, str]] = []
    usage = openai_usage(raw_usage)
    choice = {
        "index": 0,
        "message": reply,
        "logprobs": None,
        "finish_reason": finish_reason(message.get("stop_reason"), unknown, called="tool_calls" in reply),
    }
    out = {
        "id": message["id"],
        "object": "chat.completion",
        "created": created,
        "model": message["model"],
        "choices": [choice],
        "usage": usage,
    }
    return Answer(body=orjson.dumps(out), usage=usage, unknown=tuple(unknown), dropped_blocks=tuple(dropped))


def _reply(content: list[Any], *, json_mode: bool) -> tuple[dict[str, Any], list[str]]:
    """The assistant message: text joined in order, tool calls in order, thinking as reasoning."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    thinking: list[dict[str, Any]] = []
    dropped: list[str] = []
    for block in content:
        kind = block.get("type") if type(block) is dict else None
        if kind == "text":
            texts.append(_string(block, "text"))
        elif kind == "tool_use":
            arguments = orjson.dumps(block.get("input") or {}).decode()
            if json_mode and block.get("name") == JSON_TOOL:
                texts.append(arguments)
            else:
                calls.append(_tool_call(block, arguments))
        elif kind == "thinking":
            signature = block.get("signature")
            thinking.append({"type": "thinking", "thinking": _string(block, "thinking"),
                             "signature": signature if type(signature) is str else ""})
        elif kind == "redacted_thinking":
            thinking.append({"type": "redacted_thinking", "data": _string(block, "data")})
        else:
            dropped.append(label(kind))
    text = "".join(texts)
    reply: dict[str, Any] = {"role": "assistant", "content": None if calls and not text else text}
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["reasoning_content"] = "".join(b["thinking"] for b in thinking if b["type"] == "thinking")
        reply["thinking_blocks"] = thinking  # signed, so a client can send them back (§1.7)
    return reply, dropped


def _string(block: dict[str, Any], key: str) -> str:
    value = block.get(key)
    if type(value) is not str:
        raise ValueError(f"a {block.get('type')} block without a string {key}")
    return value


def _tool_call(block: dict[str, Any], arguments: str) -> dict[str, Any]:
    return {
        "id": _string(block, "id"),
        "type": "function",
        "function": {"name": _string(block, "name"), "arguments": arguments},
    }
