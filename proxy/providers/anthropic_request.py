"""OpenAI chat request → Anthropic Messages body (reference §1), a pure function of the request.

Owns the whitelist of what reaches Anthropic: the body is built field by field, so unknown client
fields never do. Refuses what Anthropic cannot express (400 before any attempt), drops and names
what it merely lacks. Messages and content parts are `anthropic_messages`'. No I/O, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from ..caps import Caps
from ..errors import invalid_value
from .anthropic_answer import JSON_TOOL
from .anthropic_messages import Build, convert_messages, unsupported

# Fields Anthropic has no counterpart for: dropped, and counted per param by the caller.
DROPPED_PARAMS = (
    "presence_penalty", "frequency_penalty", "logit_bias", "seed", "service_tier", "store",
    "prediction", "prompt_cache_key", "verbosity", "metadata",
)
# reasoning_effort → budget_tokens (caps.thinking "budget") and output_config.effort ("adaptive")
THINKING_BUDGETS = {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192, "max": 16384}
EFFORTS = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh", "max": "max"}
MIN_THINKING_BUDGET = 1024
_FORCED = frozenset({"any", "tool"})
_OPEN_OBJECT = {"type": "object", "additionalProperties": True, "properties": {}}
# Anthropic asks for no identifying information in metadata.user_id: no e-mail, no phone number.
_PERSONAL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+|\+\d[\d\s().-]{6,}|\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}")


@dataclass(frozen=True, slots=True)
class Converted:
    """An Anthropic request body and what the conversion did to get it."""

    body: bytes
    # client params not sent: ones Anthropic lacks, sampling params the model or thinking refuses,
    # an identifying user (llm_proxy_conversion_dropped_params_total)
    dropped: tuple[str, ...]
    repairs: tuple[str, ...]  # kinds of repair done, each once (llm_proxy_conversion_repairs_total)
    stream: bool
    include_usage: bool  # the client asked for stream_options.include_usage
    json_mode: bool = False  # response_format emulated by JSON_TOOL: answers must unwrap it


def to_anthropic(data: dict[str, Any], *, model: str, caps: Caps, default_max_tokens: int) -> Converted:
    """`data` is the validated OpenAI request, `model` the upstream model name."""
    build = Build(caps)
    _refuse_unexpressible(data, build)
    out: dict[str, Any] = {"model": model, "max_tokens": _max_tokens(data, caps, default_max_tokens, build)}
    tools = _tools(data)
    choice, tools = _tool_choice(data, tools, caps)
    effort = _effort(data, caps)
    json_tool = _response_format(data, out, caps, thinking=effort is not None, choice=choice)
    if json_tool is not None:
        tools = [*(tools or []), json_tool]
        choice = {"type": "tool", "name": JSON_TOOL, "disable_parallel_tool_use": True}
    effort = _effort_kept(effort, choice, data["messages"], build)
    system, messages = convert_messages(data["messages"], build, keep_thinking=effort is not None)
    if system:
        out["system"] = system
    out["messages"] = messages
    if effort is not None:
        _add_thinking(out, effort, caps, data)
    _add_sampling(out, data, caps, build, thinking=effort is not None)
    _add_stop_and_user(out, data, build)
    if tools:
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = choice
    stream = data.get("stream") is True
    if stream:
        out["stream"] = True
    options = data.get("stream_options")
    return Converted(
        body=orjson.dumps(out),
        dropped=tuple(build.dropped),
        repairs=tuple(build.repairs),
        stream=stream,
        include_usage=stream and type(options) is dict and options.get("include_usage") is True,
        json_mode=json_tool is not None,
    )


def _refuse_unexpressible(data: dict[str, Any], build: Build) -> None:
    """400 for what would change the answer's shape; names what is merely dropped."""
    n = data.get("n")
    if n is not None and n != 1:
        raise unsupported("n", "n>1 is not supported by provider anthropic.")
    if data.get("logprobs") is True:
        raise unsupported("logprobs", "logprobs is not supported by provider anthropic.")
    if data.get("top_logprobs"):
        raise unsupported("top_logprobs", "top_logprobs is not supported by provider anthropic.")
    modalities = data.get("modalities")
    if data.get("audio") is not None or (type(modalities) is list and "audio" in modalities):
        param = "audio" if data.get("audio") is not None else "modalities"
        raise unsupported(param, "Audio output is not supported by provider anthropic.")
    if data.get("web_search_options") is not None:
        raise unsupported("web_search_options", "web_search_options is not supported by provider anthropic.")
    for name in DROPPED_PARAMS:
        if data.get(name) is not None:
            build.dropped.append(name)


def _max_tokens(data: dict[str, Any], caps: Caps, default: int, build: Build) -> int:
    asked = data.get("max_completion_tokens") or data.get("max_tokens")
    value: int = asked or default
    ceiling = caps.max_output_tokens
    if ceiling is not None and value > ceiling:
        if asked:
            build.repair("clamped_max_tokens")
        value = ceiling
    return value


def _tools(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = data.get("tools")
    if tools is None and type(data.get("functions")) is list:  # the legacy form
        tools = [{"type": "function", "function": function} for function in data["functions"]]
    if not tools:
        return None
    return [_tool(tool, j) for j, tool in enumerate(tools)]


def _tool(tool: Any, j: int) -> dict[str, Any]:
    if type(tool) is not dict:
        raise invalid_value(f"tools[{j}]", "Each tool must be an object.")
    if (tool.get("type") or "function") != "function":
        raise unsupported(f"tools[{j}].type", "Only function tools are supported by provider anthropic.")
    function = tool.get("function")
    name = function.get("name") if type(function) is dict else None
    if type(name) is not str or not name:
        raise invalid_value(f"tools[{j}].function.name", "A function tool needs a name.")
    assert type(function) is dict
    schema = function.get("parameters")
    if schema is None:
        schema = {"type": "object", "properties": {}}
    elif type(schema) is not dict:
        raise invalid_value(f"tools[{j}].function.parameters", "`parameters` must be an object.")
    elif "type" not in schema:
        schema = {"type": "object", **schema}
    out: dict[str, Any] = {"name": name}
    if type(function.get("description")) is str:
        out["description"] = function["description"]
    out["input_schema"] = schema
    if type(function.get("strict")) is bool:
        out["strict"] = function["strict"]
    cache_control = tool.get("cache_control") or function.get("cache_control")
    if cache_control is not None:
        out["cache_control"] = cache_control
    return out


def _tool_choice(
    data: dict[str, Any], tools: list[dict[str, Any]] | None, caps: Caps
) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    """Anthropic's tool_choice (None: send none) and the tools left after `allowed_tools`."""
    if not tools:
        return None, tools  # Anthropic refuses a tool_choice without tools
    raw = data.get("tool_choice")
    if raw is None and data.get("tools") is None:
        raw = _legacy_choice(data.get("function_call"))
    choice: dict[str, Any] | None
    if raw is None:
        choice = None
    elif raw in ("auto", "none", "required"):
        choice = {"type": "any" if raw == "required" else raw}
    elif type(raw) is dict and raw.get("type") == "function":
        name = raw.get("function", {}).get("name") if type(raw.get("function")) is dict else None
        if type(name) is not str or not name:
            raise invalid_value("tool_choice.function.name", "A named tool_choice needs a name.")
        choice = {"type": "tool", "name": name}
    elif type(raw) is dict and raw.get("type") == "allowed_tools":
        choice, tools = _allowed_tools(raw.get("allowed_tools"), tools)
    else:
        raise invalid_value("tool_choice", "`tool_choice` must be auto, none, required or a tool.")
    if choice is not None and choice["type"] in _FORCED and not caps.forced_tool_choice:
        raise unsupported("tool_choice", "This model does not support a forced tool_choice.")
    if data.get("parallel_tool_calls") is False and (choice is None or choice["type"] != "none"):
        choice = {"type": "auto"} if choice is None else choice
        choice["disable_parallel_tool_use"] = True
    return choice, tools


def _legacy_choice(function_call: Any) -> Any:
    if type(function_call) is dict:
        return {"type": "function", "function": function_call}
    return function_call if function_call in ("auto", "none") else None


def _allowed_tools(
    allowed: Any, tools: list[dict[str, Any]]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Anthropic has no subset form: send only the listed tools (all when none is declared)."""
    if type(allowed) is not dict or allowed.get("mode") not in ("auto", "required"):
        raise invalid_value("tool_choice.allowed_tools", "`allowed_tools` needs a mode of auto or required.")
    names = set()
    listed = allowed.get("tools")
    for tool in listed if type(listed) is list else ():
        function = tool.get("function") if type(tool) is dict else None
        name = function.get("name") if type(function) is dict else tool.get("name") if type(tool) is dict else None
        if type(name) is str:
            names.add(name)
    subset = [tool for tool in tools if tool["name"] in names]
    return {"type": "any" if allowed["mode"] == "required" else "auto"}, subset or tools


def _effort(data: dict[str, Any], caps: Caps) -> str | None:
    """The reasoning effort that asks for thinking, or None."""
    effort = data.get("reasoning_effort")
    if effort is None or effort == "none":
        return None
    if type(effort) is not str or effort not in THINKING_BUDGETS:
        raise invalid_value("reasoning_effort", f"`reasoning_effort` must be one of none, {', '.join(THINKING_BUDGETS)}.")
    if caps.thinking == "none":
        raise unsupported("reasoning_effort", "This model does not support reasoning_effort.")
    return str(effort)


def _response_format(
    data: dict[str, Any], out: dict[str, Any], caps: Caps, *, thinking: bool, choice: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Sets `output_config.format` natively, or returns the forced tool that emulates it."""
    fmt = data.get("response_format")
    if fmt is None:
        return None
    if type(fmt) is not dict:
        raise invalid_value("response_format", "`response_format` must be an object.")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if type(spec) is dict else None
        schema = {"type": "object", "properties": {}} if schema is None else schema
        if type(schema) is not dict:
            raise invalid_value("response_format.json_schema.schema", "The schema must be an object.")
        if caps.structured_outputs:
            out.setdefault("output_config", {})["format"] = {"type": "json_schema", "schema": closed_schema(schema)}
            return None
    elif kind == "json_object":
        schema = _OPEN_OBJECT
    else:
        raise invalid_value("response_format.type", "`response_format.type` must be text, json_schema or json_object.")
    forced = choice is not None and choice["type"] in _FORCED
    if thinking or forced or not caps.forced_tool_choice or schema.get("type", "object") != "object":
        raise unsupported("response_format", "This response_format cannot be served by this model with these options.")
    return {"name": JSON_TOOL, "description": "Respond with a JSON object.", "input_schema": {"type": "object", **schema}}


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONES = ("items", "not", "additionalProperties", "if", "then", "else", "contains")


def closed_schema(schema: Any) -> Any:
    """A copy with `additionalProperties: false` on every object schema that lists properties and
    says nothing itself: structured outputs require it to be explicit."""
    if type(schema) is not dict:
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if type(out.get(key)) is dict:
            out[key] = {name: closed_schema(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if type(out.get(key)) is list:
            out[key] = [closed_schema(sub) for sub in out[key]]
    for key in _SCHEMA_ONES:
        if key in out:
            out[key] = closed_schema(out[key])
    if type(out.get("properties")) is dict and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _effort_kept(
    effort: str | None, choice: dict[str, Any] | None, messages: list[Any], build: Build
) -> str | None:
    """The effort, unless thinking must stay off: with a forced tool (thinking allows only auto
    or none, and the tool choice wins), or over tool history it could not continue."""
    if effort is None:
        return None
    if choice is not None and choice["type"] in _FORCED:
        build.repair("thinking_disabled_forced_tool_choice")
        return None
    if not _tool_history_signed(messages):
        build.repair("thinking_disabled_tool_history")
        return None
    return effort


def _tool_history_signed(messages: list[Any]) -> bool:
    """Whether thinking can be on: the latest assistant turn with tool calls carries a signed
    thinking block (Anthropic rejects it otherwise), or there is no such turn."""
    for message in reversed(messages):
        if message.get("role") != "assistant" or not (message.get("tool_calls") or message.get("function_call")):
            continue
        blocks = message.get("thinking_blocks")
        return type(blocks) is list and any(
            type(b) is dict and (b.get("type") == "redacted_thinking" or bool(b.get("signature")))
            for b in blocks
        )
    return True


def _add_thinking(out: dict[str, Any], effort: str, caps: Caps, data: dict[str, Any]) -> None:
    thinking: dict[str, Any]
    if caps.thinking == "adaptive":
        thinking = {"type": "adaptive"}
        out.setdefault("output_config", {})["effort"] = EFFORTS[effort]
    else:
        budget = min(THINKING_BUDGETS[effort], out["max_tokens"] - 1)
        if budget < MIN_THINKING_BUDGET:
            named_max_tokens = data.get("max_completion_tokens") is None and data.get("max_tokens") is not None
            param = "max_tokens" if named_max_tokens else "max_completion_tokens"
            raise invalid_value(param, "max_tokens is too small for reasoning_effort on this model.")
        thinking = {"type": "enabled", "budget_tokens": budget}
    if caps.expose_reasoning:
        thinking["display"] = "summarized"
    out["thinking"] = thinking


def _add_sampling(out: dict[str, Any], data: dict[str, Any], caps: Caps, build: Build, *, thinking: bool) -> None:
    """temperature (≤ 1), top_p and top_k, unless the model or thinking refuses them."""
    for name in ("temperature", "top_p", "top_k"):
        value = data.get(name)
        if value is None:
            continue
        if name == "top_k" and (type(value) is not int or value < 0):
            raise invalid_value("top_k", "`top_k` must be a non-negative integer.")
        allowed = caps.sampling_params and (
            not thinking or (name == "top_p" and 0.95 <= value <= 1)
        )
        if not allowed:
            build.dropped.append(name)
        elif name == "temperature" and value > 1:
            out[name] = 1.0  # Anthropic's range is 0–1; its own OpenAI layer caps it the same way
            build.repair("clamped_temperature")
        else:
            out[name] = value


def _add_stop_and_user(out: dict[str, Any], data: dict[str, Any], build: Build) -> None:
    stop = data.get("stop")
    if stop is not None:
        sequences = [stop] if type(stop) is str else stop
        kept = [sequence for sequence in sequences if sequence.strip()]
        if len(kept) < len(sequences):
            build.repair("whitespace_stop_sequence")  # Anthropic takes only non-whitespace ones
        if kept:
            out["stop_sequences"] = kept
    user = data.get("safety_identifier") or data.get("user")
    if user is None:
        return
    if type(user) is str and 0 < len(user) <= 256 and not _PERSONAL.fullmatch(user):
        out["metadata"] = {"user_id": user}
    else:
        build.dropped.append("user")
