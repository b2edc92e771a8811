"""Anthropic Messages request (`POST /v1/messages`) → OpenAI Chat Completions body (reference §7.4).

Owns the reverse request mapping (built field by field from a whitelist, so unknown client
fields never reach the upstream), tool-name truncation and the count_tokens estimate (§7.7);
the request it converts was validated by `messages_validation`. Pure: no I/O, never fetches an
image URL.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import invalid_value, unsupported_field

MAX_TOOL_NAME = 64  # OpenAI's limit on function names
MAX_STOP = 4  # OpenAI's limit on `stop`
# Fields with no Chat Completions counterpart: dropped, and named in Converted.dropped.
DROPPED_FIELDS = ("top_k", "context_management", "mcp_servers", "container", "inference_geo", "service_tier")
EFFORTS = frozenset({"minimal", "low", "medium", "high", "xhigh", "max"})
SERVER_TOOLS = ("web_search", "web_fetch", "bash_", "text_editor_", "computer_", "code_execution_")
IMAGE_TOKENS = 1600  # Anthropic's figure for a large image; base64 bytes say nothing of tokens
CHARS_PER_TOKEN = 3.5  # conservative: overcounting compacts early, undercounting overflows


@dataclass(frozen=True, slots=True)
class Converted:
    """An OpenAI chat body and what the conversion did to get it."""

    body: bytes
    data: dict[str, Any]  # the body, parsed
    dropped: tuple[str, ...]  # client fields not sent (llm_proxy_conversion_dropped_params_total)
    tool_names: dict[str, str]  # upstream name → the client's, for truncated names only (B29)
    stream: bool
    stop_sequences: tuple[str, ...]  # to tell stop_sequence from end_turn when an upstream says


def to_openai(data: dict[str, Any], *, model: str) -> Converted:
    """`data` is the validated Anthropic request, `model` the upstream model name."""
    dropped: list[str] = [name for name in DROPPED_FIELDS if data.get(name) is not None]
    names: dict[str, str] = {}
    out: dict[str, Any] = {"model": model, "messages": _messages(data, names, dropped)}
    out["max_completion_tokens"] = data["max_tokens"]
    for name in ("temperature", "top_p"):
        if data.get(name) is not None:
            out[name] = data[name]
    stops = tuple(data.get("stop_sequences") or ())
    if len(stops) > MAX_STOP:
        raise unsupported_field("stop_sequences", f"At most {MAX_STOP} stop sequences can be sent upstream.")
    if stops:
        out["stop"] = list(stops)
    _add_tools(out, data, names, dropped)
    _add_reasoning(out, data)
    _add_format(out, data)
    metadata = data.get("metadata")
    if type(metadata) is dict and type(metadata.get("user_id")) is str and metadata["user_id"]:
        out["safety_identifier"] = metadata["user_id"]
    stream = data.get("stream") is True
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # settlement needs the usage chunk
    return Converted(orjson.dumps(out), out, tuple(dropped), names, stream, stops)


def tool_name(name: str, names: dict[str, str]) -> str:
    """A name OpenAI accepts: over 64 characters, 55 of it + `_` + 8 hex of its sha256 (stateless,
    so history and declarations agree); the mapping back is recorded in `names`."""
    if len(name) <= MAX_TOOL_NAME:
        return name
    short = f"{name[:55]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    names[short] = name
    return short


def _messages(data: dict[str, Any], names: dict[str, str], dropped: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = _system(data.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(data["messages"]):
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if type(content) is str else content
        if message["role"] == "user":
            out.extend(_user(blocks, i))
        else:
            out.extend(_assistant(blocks, i, names, dropped))
    return out


def _system(system: Any) -> str:
    if system is None or type(system) is str:
        return system or ""
    texts: list[str] = []
    for j, block in enumerate(system):
        if type(block) is not dict or block.get("type") != "text" or type(block.get("text")) is not str:
            raise invalid_value(f"system.{j}", "System blocks must be text blocks.")
        if block["text"]:
            texts.append(block["text"])
    return "\n\n".join(texts)


def _user(blocks: list[dict[str, Any]], i: int) -> list[dict[str, Any]]:
    """Tool results first, as `tool` messages in order; then one user message of the rest, with
    the images tool results held (OpenAI tool messages take text only)."""
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    lifted: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind, where = block["type"], f"messages.{i}.content.{j}"
        if kind == "tool_result":
            tools.append(_tool_result(block, where, lifted))
        elif kind == "text":
            if _text(block, where):
                parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image(block, where))
        elif kind == "document":
            parts.append(_document(block, where))
        else:
            raise unsupported_field(f"{where}.type", f"A `{kind[:40]}` block in a user turn has no OpenAI form.")
    parts = lifted + parts
    if not parts:
        return tools
    if all(p["type"] == "text" for p in parts):
        return [*tools, {"role": "user", "content": "\n\n".join(p["text"] for p in parts)}]
    return [*tools, {"role": "user", "content": parts}]


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if type(text) is not str:
        raise invalid_value(f"{where}.text", "A text block needs a string `text`.")
    return text


def _tool_result(block: dict[str, Any], where: str, lifted: list[dict[str, Any]]) -> dict[str, Any]:
    tool_use_id = block.get("tool_use_id")
    if type(tool_use_id) is not str or not tool_use_id:
        raise invalid_value(f"{where}.tool_use_id", "A tool_result needs a `tool_use_id`.")
    content = block.get("content")
    texts: list[str] = []
    if type(content) is str:
        texts.append(content)
    elif type(content) is list:
        for k, part in enumerate(content):
            kind = part.get("type") if type(part) is dict else None
            if kind == "text":
                texts.append(_text(part, f"{where}.content.{k}"))
            elif kind == "image":
                lifted.append(_image(part, f"{where}.content.{k}"))
            else:
                raise unsupported_field(f"{where}.content.{k}", "A tool_result may hold only text and images.")
    elif content is not None:
        raise invalid_value(f"{where}.content", "`content` must be a string or an array of blocks.")
    text = "\n\n".join(t for t in texts if t)
    if block.get("is_error") is True:
        text = f"Error: {text}"  # OpenAI has no error flag on tool messages
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _source(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if type(source) is not dict:
        raise invalid_value(f"{where}.source", f"A {block['type']} block needs a `source`.")
    return source


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = _source(block, where)
    kind = source.get("type")
    if kind == "base64" and type(source.get("data")) is str and type(source.get("media_type")) is str:
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif kind == "url" and type(source.get("url")) is str:
        url = source["url"]  # handed on as a URL, never fetched (reference §0.7)
    else:
        raise unsupported_field(f"{where}.source", "Images must be base64 data or a URL.")
    return {"type": "image_url", "image_url": {"url": url}}


def _document(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = _source(block, where)
    kind = source.get("type")
    if kind == "base64" and source.get("media_type") == "application/pdf" and type(source.get("data")) is str:
        return {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{source['data']}"}}
    if kind == "text" and type(source.get("data")) is str:
        return {"type": "text", "text": source["data"]}
    raise unsupported_field(f"{where}.source", "Documents must be base64 PDF or plain text.")


def _assistant(
    blocks: list[dict[str, Any]], i: int, names: dict[str, str], dropped: list[str]
) -> list[dict[str, Any]]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        kind, where = block["type"], f"messages.{i}.content.{j}"
        if kind == "text":
            if _text(block, where):
                texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(_tool_call(block, where, names))
        elif kind == "thinking":
            if type(block.get("thinking")) is str and block["thinking"]:
                thinking.append(block["thinking"])
        elif kind == "redacted_thinking" or kind == "server_tool_use" or kind.endswith("_tool_result"):
            _drop(dropped, f"{kind}_blocks" if kind == "redacted_thinking" else "server_tool_blocks")
        else:
            raise unsupported_field(f"{where}.type", f"A `{kind[:40]}` block in an assistant turn has no OpenAI form.")
    if not (texts or calls or thinking):
        return []
    reply: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    if thinking:
        reply["reasoning_content"] = "\n\n".join(thinking)  # DeepSeek-style upstreams need it back
    return [reply]


def _drop(dropped: list[str], name: str) -> None:
    if name not in dropped:
        dropped.append(name)


def _tool_call(block: dict[str, Any], where: str, names: dict[str, str]) -> dict[str, Any]:
    tool_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
    if type(tool_id) is not str or not tool_id or type(name) is not str or not name:
        raise invalid_value(where, "A tool_use block needs an `id` and a `name`.")
    if arguments is not None and type(arguments) is not dict:
        raise invalid_value(f"{where}.input", "A tool_use `input` must be an object.")
    return {
        "id": tool_id,  # OpenAI takes any string: a call and its result still pair
        "type": "function",
        "function": {"name": tool_name(name, names), "arguments": orjson.dumps(arguments or {}).decode()},
    }


def _add_tools(out: dict[str, Any], data: dict[str, Any], names: dict[str, str], dropped: list[str]) -> None:
    declared: dict[str, str] = {}  # client name → upstream name
    tools: list[dict[str, Any]] = []
    for j, tool in enumerate(data.get("tools") or ()):
        if type(tool) is not dict or type(tool.get("name")) is not str or not tool["name"]:
            raise invalid_value(f"tools.{j}.name", "Each tool needs a `name`.")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            if type(kind) is str and kind.startswith(SERVER_TOOLS):
                _drop(dropped, "server_tools")
                continue
            raise unsupported_field(f"tools.{j}.type", "Only custom tools can be sent to this upstream.")
        schema = tool.get("input_schema")
        if type(schema) is not dict:
            raise invalid_value(f"tools.{j}.input_schema", "Each tool needs an `input_schema` object.")
        declared[tool["name"]] = tool_name(tool["name"], names)
        function: dict[str, Any] = {"name": declared[tool["name"]], "parameters": schema}
        if type(tool.get("description")) is str:
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    if tools:
        out["tools"] = tools
    _add_tool_choice(out, data.get("tool_choice"), declared)


def _add_tool_choice(out: dict[str, Any], choice: Any, declared: dict[str, str]) -> None:
    if choice is None:
        return
    kind = choice.get("type") if type(choice) is dict else None
    if kind not in ("auto", "any", "tool", "none"):
        raise invalid_value("tool_choice.type", "`tool_choice.type` must be auto, any, tool or none.")
    if "tools" in out:
        if kind == "tool":
            if choice.get("name") in declared:
                out["tool_choice"] = {"type": "function", "function": {"name": declared[choice["name"]]}}
        else:
            out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[kind]
        if choice.get("disable_parallel_tool_use") is True:
            out["parallel_tool_calls"] = False


def _add_reasoning(out: dict[str, Any], data: dict[str, Any]) -> None:
    thinking = data.get("thinking")
    kind = thinking.get("type") if type(thinking) is dict else None
    if thinking is None or kind == "disabled":
        return
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if type(budget) is not int or budget < 1:
            raise invalid_value("thinking.budget_tokens", "`budget_tokens` must be a positive integer.")
        out["reasoning_effort"] = "low" if budget < 2048 else "medium" if budget < 4096 else "high"
    elif kind == "adaptive":
        config = data.get("output_config")
        effort = config.get("effort") if type(config) is dict else None
        out["reasoning_effort"] = effort if effort in EFFORTS else "medium"
    else:
        raise invalid_value("thinking.type", "`thinking.type` must be enabled, adaptive or disabled.")


def _add_format(out: dict[str, Any], data: dict[str, Any]) -> None:
    config = data.get("output_config")
    fmt = config.get("format") if type(config) is dict else None
    param = "output_config.format"
    if fmt is None and data.get("output_format") is not None:
        fmt, param = data["output_format"], "output_format"
    if fmt is None:
        return
    if type(fmt) is not dict or fmt.get("type") != "json_schema" or type(fmt.get("schema")) is not dict:
        raise unsupported_field(param, "Only a json_schema output format can be sent to this upstream.")
    out["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt["schema"], "strict": True},
    }


def estimate_tokens(data: dict[str, Any]) -> int:
    """count_tokens without an Anthropic account: chars/3.5 over the system, messages and tools
    JSON, a fixed figure per image or document; never 0 for a non-empty request (B26)."""
    media = 0

    def strip(value: Any) -> Any:
        nonlocal media
        if type(value) is dict:
            if value.get("type") in ("image", "document") and type(value.get("source")) is dict:
                media += 1
                return {"type": value["type"]}
            return {k: strip(v) for k, v in value.items()}
        if type(value) is list:
            return [strip(v) for v in value]
        return value

    parts = {k: strip(data[k]) for k in ("system", "messages", "tools", "tool_choice") if data.get(k)}
    chars = len(orjson.dumps(parts).decode()) if parts else 0
    estimate = math.ceil(chars / CHARS_PER_TOKEN) + media * IMAGE_TOKENS
    return max(estimate, 1) if parts else 0
