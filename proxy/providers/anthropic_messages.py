"""OpenAI `messages` → Anthropic `system` blocks and `messages` turns (reference §1.3, §1.4).

Owns hoisting, merging, ordering and pairing of turns, content parts, tool ids and arguments;
errors name the client's own message indices. Pure: no I/O, never fetches an image URL.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import orjson

from ..caps import Caps
from ..errors import invalid_value, unsupported_field

IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")
_TOOL_ID_BAD = re.compile(r"[^a-zA-Z0-9_-]")


unsupported = unsupported_field


class Build:
    """What one conversion records as it goes: the params it dropped, the repairs it made."""

    __slots__ = ("caps", "dropped", "repairs")

    def __init__(self, caps: Caps) -> None:
        self.caps = caps
        self.dropped: list[str] = []
        self.repairs: list[str] = []

    def repair(self, kind: str) -> None:
        if kind not in self.repairs:
            self.repairs.append(kind)


class _Origins:
    """Where converted tool blocks and turns came from in the client's array, for its errors."""

    __slots__ = ("calls", "results", "turns", "last_function")

    def __init__(self) -> None:
        self.calls: dict[str, tuple[int, str]] = {}  # tool_use id → (message index, client's id)
        self.results: dict[str, int] = {}  # tool_use_id → message index
        self.turns: list[int] = []  # each turn's first message index
        self.last_function: str | None = None  # the id given to a legacy function_call


def convert_messages(
    messages: list[dict[str, Any]], build: Build, *, keep_thinking: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system blocks, turns): system/developer hoisted, empty text and turns dropped, same-role
    turns merged, tool results first and paired with their calls."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    origins = _Origins()
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "user":
            blocks = _content_blocks(message.get("content"), i, media=True)
        elif role == "assistant":
            blocks = _assistant_blocks(message, i, build, origins, keep_thinking=keep_thinking)
        elif role == "system" or role == "developer":
            blocks = _content_blocks(message.get("content"), i, media=False)
        else:
            blocks = [_tool_result(message, i, build, origins)]
        cache_control = message.get("cache_control")
        if cache_control is not None and blocks:
            blocks[-1]["cache_control"] = cache_control
        if not blocks:
            continue
        if role == "system" or role == "developer":
            system.extend(blocks)
            continue
        kind = "assistant" if role == "assistant" else "user"
        if turns and turns[-1]["role"] == kind:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": kind, "content": blocks})
            origins.turns.append(i)
    if not turns:
        raise invalid_value("messages", "No message has any content to send.")
    if origins.calls or origins.results:
        _order_and_pair(turns, origins)
    _check_ends(turns, origins, build.caps)
    return system, turns


def at(i: int, *path: str | int) -> str:
    """A client's param name, built only for an error: at(1, "content", 0) is messages[1].content[0]."""
    return f"messages[{i}]" + "".join(f"[{step}]" if type(step) is int else f".{step}" for step in path)


def _content_blocks(content: Any, i: int, *, media: bool) -> list[dict[str, Any]]:
    if content is None:
        return []
    if type(content) is str:
        return [{"type": "text", "text": content}] if content else []
    if type(content) is not list:
        raise invalid_value(at(i, "content"), "`content` must be a string or an array of parts.")
    blocks = []
    for j, part in enumerate(content):
        block = _part(part, i, j, media=media)
        if block is not None:
            blocks.append(block)
    return blocks


def _part(part: Any, i: int, j: int, *, media: bool) -> dict[str, Any] | None:
    """One content part as a block; None for an empty text (Anthropic rejects those)."""
    if type(part) is not dict:
        raise invalid_value(at(i, "content", j), "Each content part must be an object.")
    kind = part.get("type")
    if kind == "text" or kind == "refusal":
        text = part.get(kind)
        if type(text) is not str:
            raise invalid_value(at(i, "content", j, kind), f"A {kind} part needs a string `{kind}`.")
        if not text:
            return None
        block: dict[str, Any] = {"type": "text", "text": text}
    elif media and kind == "image_url":
        block = _image(part.get("image_url"), at(i, "content", j, "image_url"))
    elif media and kind == "file":
        block = _file(part.get("file"), at(i, "content", j, "file"))
    elif kind == "input_audio":
        raise unsupported(at(i, "content", j), "Audio input is not supported by provider anthropic.")
    else:
        raise unsupported(at(i, "content", j, "type"), "This content part type is not supported here by provider anthropic.")
    cache_control = part.get("cache_control")
    if cache_control is not None:
        block["cache_control"] = cache_control
    return block


def _image(image_url: Any, param: str) -> dict[str, Any]:
    """A data URL becomes a base64 source; an http(s) URL is handed on, never fetched here."""
    url = image_url.get("url") if type(image_url) is dict else image_url
    if type(url) is not str:
        raise invalid_value(param, "`image_url.url` must be a string.")
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        media_type, data = _data_url(url, param)
        if media_type in IMAGE_TYPES:
            return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
        if media_type == "application/pdf":
            return _pdf(data)
        raise invalid_value(param, "An image must be JPEG, PNG, GIF or WebP.")
    if scheme.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise invalid_value(param, "An image URL must be a data: URL or an http(s) URL.")


def _file(file: Any, param: str) -> dict[str, Any]:
    if type(file) is not dict:
        raise invalid_value(param, "`file` must be an object.")
    if file.get("file_id") is not None:
        raise unsupported(f"{param}.file_id", "Uploaded file ids are not supported by provider anthropic.")
    data_url = file.get("file_data")
    if type(data_url) is not str or not data_url[:5].lower() == "data:":
        raise invalid_value(f"{param}.file_data", "`file_data` must be a data: URL.")
    media_type, data = _data_url(data_url, f"{param}.file_data")
    if media_type != "application/pdf":
        raise invalid_value(f"{param}.file_data", "A file must be a PDF.")
    return _pdf(data)


def _pdf(data: str) -> dict[str, Any]:
    return {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": data}}


def _data_url(url: str, param: str) -> tuple[str, str]:
    """(media type, base64 data) of `data:<type>(;<param>)*;base64,<data>` (RFC 2397)."""
    comma = url.find(",")
    header = url[5:comma].split(";") if comma > 0 else []
    if len(header) < 2 or header[-1].strip().lower() != "base64" or comma == len(url) - 1:
        raise invalid_value(param, "A data URL must be base64-encoded data with a media type.")
    return header[0].strip().lower(), url[comma + 1 :]


def _assistant_blocks(
    message: dict[str, Any], i: int, build: Build, origins: _Origins, *, keep_thinking: bool
) -> list[dict[str, Any]]:
    """Signed thinking (the reasoning extension), then text, then one tool_use per call."""
    blocks = _thinking_blocks(message.get("thinking_blocks")) if keep_thinking else []
    blocks.extend(_content_blocks(message.get("content"), i, media=False))
    refusal = message.get("refusal")
    if type(refusal) is str and refusal and not any(block["type"] == "text" for block in blocks):
        blocks.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    function_call = message.get("function_call")
    if calls is not None:
        if type(calls) is not list:
            raise invalid_value(at(i, "tool_calls"), "`tool_calls` must be an array.")
        for k, call in enumerate(calls):
            blocks.append(_tool_use(call, ("tool_calls", k), i, build, origins))
    elif type(function_call) is dict:  # the legacy form: its result is the next `function` message
        call = {"id": f"call_function_{i}", "function": function_call}
        origins.last_function = call["id"]
        blocks.append(_tool_use(call, ("function_call",), i, build, origins))
    return blocks


def _thinking_blocks(blocks: Any) -> list[dict[str, Any]]:
    """Only signed blocks, unmodified: Anthropic rejects unsigned or edited ones."""
    out: list[dict[str, Any]] = []
    for block in blocks if type(blocks) is list else ():
        kind = block.get("type") if type(block) is dict else None
        signature = block.get("signature") if kind == "thinking" else None
        if type(signature) is str and signature and type(block.get("thinking")) is str:
            out.append({"type": "thinking", "thinking": block["thinking"], "signature": block["signature"]})
        elif kind == "redacted_thinking" and type(block.get("data")) is str:
            out.append({"type": "redacted_thinking", "data": block["data"]})
    return out


def _tool_use(call: Any, where: tuple[str | int, ...], i: int, build: Build, origins: _Origins) -> dict[str, Any]:
    if type(call) is not dict:
        raise invalid_value(at(i, *where), "Each tool call must be an object.")
    if (call.get("type") or "function") != "function":
        raise unsupported(at(i, *where, "type"), "Only function tool calls are supported by provider anthropic.")
    function = call.get("function")
    name = function.get("name") if type(function) is dict else None
    if type(name) is not str or not name:
        raise invalid_value(at(i, *where, "function", "name"), "A tool call needs a function name.")
    assert type(function) is dict
    tool_id = sanitized_tool_id(call.get("id"), build)
    if tool_id is None:
        raise invalid_value(at(i, *where, "id"), "A tool call id must be a non-empty string.")
    origins.calls[tool_id] = (i, call["id"])
    return {"type": "tool_use", "id": tool_id, "name": name, "input": _arguments(function.get("arguments"), build)}


def sanitized_tool_id(raw: Any, build: Build) -> str | None:
    """Anthropic's id pattern `^[a-zA-Z0-9_-]+$` (None for an empty id); stateless, so a call and
    its result still match."""
    if type(raw) is not str or not raw:
        return None
    if _TOOL_ID.fullmatch(raw):
        return raw
    build.repair("sanitized_tool_id")
    return f"{_TOOL_ID_BAD.sub('_', raw)}_{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def _arguments(arguments: Any, build: Build) -> Any:
    """The call's input object. Invalid JSON in history becomes {}: failing here would poison
    every later turn of the conversation."""
    if arguments is None or arguments == "":
        return {}
    if type(arguments) is str:
        try:
            value = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            value = None
        if type(value) is dict:
            return value
    elif type(arguments) is dict:
        return arguments
    build.repair("invalid_tool_arguments")
    return {}


def _tool_result(message: dict[str, Any], i: int, build: Build, origins: _Origins) -> dict[str, Any]:
    if message["role"] == "tool":
        tool_id = sanitized_tool_id(message.get("tool_call_id"), build)
        if tool_id is None:
            raise invalid_value(at(i, "tool_call_id"), "A tool call id must be a non-empty string.")
    elif origins.last_function is not None:
        tool_id, origins.last_function = origins.last_function, None
    else:
        raise invalid_value(at(i, "role"), "A function message must follow an assistant function_call.")
    origins.results[tool_id] = i
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_id}
    content = message.get("content")
    if type(content) is str:
        if content:
            block["content"] = content
    else:
        parts = _content_blocks(content, i, media=True)
        if parts:
            block["content"] = parts
    return block


def _order_and_pair(turns: list[dict[str, Any]], origins: _Origins) -> None:
    """Tool results first in each user turn; every call of an assistant turn answered in the
    next turn, and nothing else answered: Anthropic's own errors would index converted turns."""
    expected: list[str] = []
    for turn in turns:
        content = turn["content"]
        if turn["role"] == "assistant":
            expected = [block["id"] for block in content if block["type"] == "tool_use"]
            continue
        results = [block for block in content if block["type"] == "tool_result"]
        if results and len(results) < len(content):
            turn["content"] = results + [block for block in content if block["type"] != "tool_result"]
        for block in results:
            if block["tool_use_id"] not in expected:
                where = at(origins.results[block["tool_use_id"]], "tool_call_id")
                raise invalid_value(where, "This tool message answers no tool call of the assistant message before it.")
        _require_answered(expected, {block["tool_use_id"] for block in results}, origins)
        expected = []
    _require_answered(expected, set(), origins)


def _require_answered(expected: list[str], answered: set[str], origins: _Origins) -> None:
    for tool_id in expected:
        if tool_id not in answered:
            i, raw = origins.calls[tool_id]
            raise invalid_value(at(i, "tool_calls"), f"tool call {raw} has no tool message.")


def _check_ends(turns: list[dict[str, Any]], origins: _Origins, caps: Caps) -> None:
    """The first turn is the user's; a final assistant turn is a prefill, if the model takes one."""
    if turns[0]["role"] == "assistant":
        raise invalid_value(at(origins.turns[0], "role"), "The first message after system messages must be a user message.")
    last = turns[-1]
    if last["role"] != "assistant":
        return
    if not caps.prefill:
        raise unsupported("messages", "This model does not support assistant message prefill; end with a user message.")
    block = last["content"][-1]
    if block["type"] == "text":  # Anthropic refuses a prefill ending in whitespace
        text = block["text"].rstrip()
        if text:
            block["text"] = text
        elif len(last["content"]) > 1:
            last["content"].pop()
        else:
            turns.pop()
