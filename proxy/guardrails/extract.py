"""Where guardrails look: the text of a request that reaches the model, and of an answer that
reaches the client, for both client APIs, as `Segment`s naming where each text lives.

`api` is "chat" (OpenAI Chat Completions) or "messages" (Anthropic Messages). Only text is
taken: message text in every role, text parts and blocks, tool-call arguments, tool inputs and
results; never JSON keys, ids, names, image or audio data. Pure functions over parsed bodies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Segment:
    """One text: `location` as findings name it, `path` to it in the parsed body. `json_text`:
    the text is itself a JSON document (tool-call arguments), so a replacement outside its
    strings must be a string."""

    location: str
    path: Path
    text: str
    json_text: bool = False


def request_segments(api: str, data: dict[str, Any]) -> list[Segment]:
    """Every text of a request body that reaches the model."""
    if api == "chat":
        return list(_chat_request(data))
    if api == "messages":
        return list(_messages_request(data))
    raise ValueError(f"unknown api {api!r}")


# The members of a request body (by API) and of a JSON answer that every text of
# `request_segments` and `answer_segments` lies inside.
REQUEST_ROOTS = {"chat": ("messages",), "messages": ("system", "messages")}
ANSWER_ROOTS = {"chat": ("choices",), "messages": ("content",)}


def answer_segments(api: str, data: Any) -> list[Segment]:
    """Every text of a JSON answer that reaches the client."""
    if type(data) is not dict:
        return []
    if api == "chat":
        return list(_chat_answer(data))
    if api == "messages":
        return list(_blocks(data.get("content"), "content", ("content",)))
    raise ValueError(f"unknown api {api!r}")


def _chat_request(data: dict[str, Any]) -> Iterator[Segment]:
    messages = data.get("messages")
    if type(messages) is not list:
        return
    for i, message in enumerate(messages):
        if type(message) is dict:
            yield from _chat_message(message, f"messages[{i}]", ("messages", i))


def _chat_answer(data: dict[str, Any]) -> Iterator[Segment]:
    choices = data.get("choices")
    if type(choices) is not list:
        return
    for i, choice in enumerate(choices):
        message = choice.get("message") if type(choice) is dict else None
        if type(message) is dict:
            yield from _chat_message(message, f"choices[{i}].message", ("choices", i, "message"))


def _chat_message(message: dict[str, Any], where: str, path: Path) -> Iterator[Segment]:
    content = message.get("content")
    if type(content) is str:
        yield Segment(f"{where}.content", (*path, "content"), content)
    elif type(content) is list:
        for j, part in enumerate(content):
            if type(part) is dict and part.get("type") in ("text", "refusal"):
                field = part["type"]
                text = part.get(field)
                if type(text) is str:
                    yield Segment(f"{where}.content[{j}].{field}", (*path, "content", j, field), text)
    refusal = message.get("refusal")
    if type(refusal) is str:
        yield Segment(f"{where}.refusal", (*path, "refusal"), refusal)
    calls = message.get("tool_calls")
    if type(calls) is list:
        for j, call in enumerate(calls):
            function = call.get("function") if type(call) is dict else None
            if type(function) is dict and type(function.get("arguments")) is str:
                yield Segment(
                    f"{where}.tool_calls[{j}].function.arguments",
                    (*path, "tool_calls", j, "function", "arguments"), function["arguments"], json_text=True,
                )
    legacy = message.get("function_call")
    if type(legacy) is dict and type(legacy.get("arguments")) is str:
        yield Segment(
            f"{where}.function_call.arguments", (*path, "function_call", "arguments"), legacy["arguments"],
            json_text=True,
        )


def _messages_request(data: dict[str, Any]) -> Iterator[Segment]:
    system = data.get("system")
    if type(system) is str:
        yield Segment("system", ("system",), system)
    else:
        yield from _blocks(system, "system", ("system",))
    messages = data.get("messages")
    if type(messages) is not list:
        return
    for i, message in enumerate(messages):
        if type(message) is not dict:
            continue
        content = message.get("content")
        where, path = f"messages[{i}].content", ("messages", i, "content")
        if type(content) is str:
            yield Segment(where, path, content)
        else:
            yield from _blocks(content, where, path)


def _blocks(blocks: Any, where: str, path: Path) -> Iterator[Segment]:
    """Anthropic content blocks: text, tool_use input, tool_result content (string or blocks).
    Thinking blocks are not taken: their signature covers their text, which cannot change."""
    if type(blocks) is not list:
        return
    for j, block in enumerate(blocks):
        if type(block) is not dict:
            continue
        kind = block.get("type")
        at, to = f"{where}[{j}]", (*path, j)
        if kind == "text" and type(block.get("text")) is str:
            yield Segment(f"{at}.text", (*to, "text"), block["text"])
        elif kind == "tool_use":
            yield from _strings(block.get("input"), f"{at}.input", (*to, "input"))
        elif kind == "tool_result":
            content = block.get("content")
            if type(content) is str:
                yield Segment(f"{at}.content", (*to, "content"), content)
            else:
                yield from _blocks(content, f"{at}.content", (*to, "content"))


def _strings(value: Any, where: str, path: Path) -> Iterator[Segment]:
    """The string values inside a JSON value (a tool's input), all named `where`."""
    if type(value) is str:
        yield Segment(where, path, value)
    elif type(value) is dict:
        for key, item in value.items():
            yield from _strings(item, where, (*path, key))
    elif type(value) is list:
        for index, item in enumerate(value):
            yield from _strings(item, where, (*path, index))
