"""Parse a chat completion request body once and check what SPEC §4 names.

Reads only the fields the gateway acts on; every other field passes through untouched. An
optional field that is `null` counts as absent (SPEC §3), so every check skips a null value.
Does no I/O and knows nothing of keys, models or upstreams.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import invalid, invalid_value

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})

# Fields that would send the request, or credentials, somewhere the operator did not configure.
REDIRECTING_FIELDS = (
    "api_base",
    "base_url",
    "api_key",
    "api_version",
    "custom_llm_provider",
    "extra_headers",
    "extra_query",
)

# (field, low, high, integer?)
RANGES = (
    ("temperature", 0, 2, False),
    ("top_p", 0, 1, False),
    ("n", 1, 128, True),
    ("presence_penalty", -2, 2, False),
    ("frequency_penalty", -2, 2, False),
    ("top_logprobs", 0, 20, True),
    ("max_tokens", 1, None, True),
    ("max_completion_tokens", 1, None, True),
)


class ChatRequest:
    """What the gateway needs from a validated body; `data` is the parsed body itself."""

    __slots__ = ("data", "model", "stream", "usage_requested", "request_id", "n", "max_tokens")

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.model: str = data["model"]
        self.stream: bool = data.get("stream") is True
        options = data.get("stream_options")
        self.usage_requested = bool(options and options.get("include_usage") is True)
        self.request_id: str | None = data.get("request_id")
        self.n: int = data.get("n") or 1
        self.max_tokens: int | None = data.get("max_completion_tokens") or data.get("max_tokens")

    def with_data(self, data: dict[str, Any]) -> ChatRequest:
        return ChatRequest(data)


def parse_chat_request(body: bytes) -> ChatRequest:
    data = parse_body(body)
    _check_model_and_messages(data)
    _check_ranges(data)
    _check_shapes(data)
    return ChatRequest(data)


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, without a field that would redirect it (either API)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise invalid("invalid_json", "The request body is not valid JSON.") from None
    if type(data) is not dict:
        raise invalid("invalid_json", "The request body must be a JSON object.")
    for name in REDIRECTING_FIELDS:
        if name in data:
            raise invalid(
                "unsupported_field", f"The field `{name}` is not accepted by this gateway.", name
            )
    return data


def _check_model_and_messages(data: dict[str, Any]) -> None:
    model = data.get("model")
    if model is None:
        raise invalid("missing_field", "The field `model` is required.", "model")
    if type(model) is not str or not model:
        raise invalid_value("model", "`model` must be a non-empty string.")
    messages = data.get("messages")
    if messages is None:
        raise invalid("missing_field", "The field `messages` is required.", "messages")
    if type(messages) is not list or not messages:
        raise invalid_value("messages", "`messages` must be a non-empty array.")
    for i, message in enumerate(messages):
        if type(message) is not dict:
            raise invalid_value(f"messages[{i}]", "Each message must be an object.")
        role = message.get("role")
        if type(role) is not str or role not in ROLES:
            raise invalid_value(
                f"messages[{i}].role",
                f"`messages[{i}].role` must be one of {', '.join(sorted(ROLES))}.",
            )


def _check_ranges(data: dict[str, Any]) -> None:
    for name, low, high, integer in RANGES:
        value = data.get(name)
        if value is None:
            continue
        kind = type(value)
        if not (kind is int or (kind is float and not integer)):
            expected = "an integer" if integer else "a number"
            raise invalid_value(name, f"`{name}` must be {expected}.")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise invalid_value(name, f"`{name}` must be {bounds}; got {value}.")


def _check_shapes(data: dict[str, Any]) -> None:
    stop = data.get("stop")
    if stop is not None and type(stop) is not str:
        if type(stop) is not list or len(stop) > 4 or any(type(s) is not str for s in stop):
            raise invalid_value("stop", "`stop` must be a string or an array of at most 4 strings.")
    tools = data.get("tools")
    if tools is not None and (type(tools) is not list or len(tools) > 128):
        raise invalid_value("tools", "`tools` must be an array of at most 128 tools.")
    stream = data.get("stream")
    if stream is not None and type(stream) is not bool:
        raise invalid_value("stream", "`stream` must be a boolean.")
    options = data.get("stream_options")
    if options is not None:
        if type(options) is not dict:
            raise invalid_value("stream_options", "`stream_options` must be an object.")
        include_usage = options.get("include_usage")
        if include_usage is not None and type(include_usage) is not bool:
            raise invalid_value(
                "stream_options.include_usage", "`include_usage` must be a boolean."
            )
    request_id = data.get("request_id")
    if request_id is not None and (
        type(request_id) is not str or not 0 < len(request_id) <= 200 or not request_id.isprintable()
    ):
        raise invalid_value("request_id", "`request_id` must be 1 to 200 printable characters.")

