"""Parse a Messages request body (`POST /v1/messages`, count_tokens) once and check what
Anthropic itself requires (SPEC §10), as `validation` does for chat completions.

Reads only what the gateway acts on; every other field reaches an Anthropic upstream as the
client sent it. Does no I/O and knows nothing of keys, models or upstreams.
"""

from __future__ import annotations

from typing import Any

from .errors import invalid, invalid_value
from .validation import parse_body

ROLES = ("user", "assistant")


class MessagesRequest:
    """What the gateway needs from a validated Messages body; `data` is the parsed body itself.

    Has the attributes of `validation.ChatRequest` the request path reads (model, stream, n,
    max_tokens, request_id, usage_requested), plus the client's `anthropic-version` and
    `anthropic-beta` headers, forwarded to an Anthropic upstream.
    """

    __slots__ = ("data", "model", "stream", "max_tokens", "version", "beta")

    n = 1
    request_id = None  # the Messages API has no body field for it
    usage_requested = False

    def __init__(self, data: dict[str, Any], *, version: str | None, beta: str | None) -> None:
        self.data = data
        self.model: str = data["model"]
        self.stream: bool = data.get("stream") is True
        self.max_tokens: int | None = data.get("max_tokens")
        self.version = version
        self.beta = beta

    def with_data(self, data: dict[str, Any]) -> MessagesRequest:
        return MessagesRequest(data, version=self.version, beta=self.beta)


def parse_messages_request(
    body: bytes, *, version: str | None = None, beta: str | None = None, count_only: bool = False
) -> MessagesRequest:
    """The body parsed and validated; `count_only` for count_tokens, which takes no `max_tokens`."""
    data = parse_body(body)
    validate_messages(data, count_only=count_only)
    return MessagesRequest(data, version=version, beta=beta)


def validate_messages(data: dict[str, Any], *, count_only: bool = False) -> None:
    """What Anthropic itself requires of a request; GatewayError 400 naming the field."""
    model = data.get("model")
    if type(model) is not str or not model:
        raise _required("model", "`model` must be a non-empty string.", model is None)
    max_tokens = data.get("max_tokens")
    if not (count_only and max_tokens is None) and (type(max_tokens) is not int or max_tokens < 1):
        raise _required("max_tokens", "`max_tokens` must be an integer of at least 1.", max_tokens is None)
    messages = data.get("messages")
    if type(messages) is not list or not messages:
        raise _required("messages", "`messages` must be a non-empty array.", messages is None)
    for i, message in enumerate(messages):
        if type(message) is not dict or message.get("role") not in ROLES:
            raise invalid_value(f"messages.{i}.role", "Each message's `role` must be user or assistant.")
        content = message.get("content")
        if type(content) is list:
            if any(type(b) is not dict or type(b.get("type")) is not str for b in content):
                raise invalid_value(f"messages.{i}.content", "Each content block must be a typed object.")
        elif type(content) is not str:
            raise invalid_value(f"messages.{i}.content", "`content` must be a string or an array of blocks.")
    _check_options(data)


def _required(param: str, message: str, missing: bool) -> Exception:
    if missing:
        return invalid("missing_field", f"The field `{param}` is required.", param)
    return invalid_value(param, message)


def _check_options(data: dict[str, Any]) -> None:
    for name, high in (("temperature", 1.0), ("top_p", 1.0)):
        value = data.get(name)
        if value is not None and (type(value) not in (int, float) or not 0 <= value <= high):
            raise invalid_value(name, f"`{name}` must be a number between 0 and {high:g}.")
    stops = data.get("stop_sequences")
    if stops is not None and (type(stops) is not list or any(type(s) is not str for s in stops)):
        raise invalid_value("stop_sequences", "`stop_sequences` must be an array of strings.")
    for name, kind in (("stream", bool), ("tools", list), ("system", (str, list)), ("metadata", dict)):
        value = data.get(name)
        if value is not None and not isinstance(value, kind):
            raise invalid_value(name, f"`{name}` has the wrong type.")
