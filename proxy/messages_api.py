"""Anthropic's Messages API (`POST /v1/messages`, SPEC §10) as a client API.

Its requests reach a provider whose upstream speaks Messages as they came (the provider's
`native_messages()`, a pass-through), and any other provider converted: `ConvertedMessages`
puts the chat completion `messages_request` builds in front of the provider, and turns its
answers and streams (already in OpenAI's shapes, whatever the upstream) back into Anthropic's
with `messages_answer` and `messages_stream`. Errors are Anthropic's shape and status table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import orjson

from .config import AccountConfig, ModelConfig
from .errors import GatewayError, invalid_value
from .faults import Fault, Verdict
from .httpmessage import UpstreamFailure
from .messages_answer import to_anthropic_answer
from .messages_request import to_openai
from .messages_validation import MessagesRequest, parse_messages_request
from .messages_stream import MessagesStream, MessagesStreamError, error_event
from .metrics import Metrics
from .upstream import Answer, Exchange, InBandError, Outbound, Prepared, Provider, StreamReader
from .validation import ChatRequest

# Anthropic's status and error type for the gateway's own statuses (SPEC §10): 502 is its 500,
# and 503 its 529, which the SDKs and Claude Code treat as "overloaded, retry later".
ERROR_TYPES = {
    400: (400, "invalid_request_error"),
    401: (401, "authentication_error"),
    402: (402, "billing_error"),
    403: (403, "permission_error"),
    404: (404, "not_found_error"),
    405: (405, "invalid_request_error"),
    413: (413, "request_too_large"),
    422: (422, "invalid_request_error"),
    429: (429, "rate_limit_error"),
    500: (500, "api_error"),
    502: (500, "api_error"),
    503: (529, "overloaded_error"),
    504: (504, "timeout_error"),
}
IN_BAND = Verdict(Fault.TRANSIENT, reason="in-band error")


class MessagesApi:
    name = shape = "messages"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> MessagesRequest:
        return parse_messages_request(
            body, version=anthropic_header(headers, "anthropic-version"), beta=anthropic_header(headers, "anthropic-beta")
        )

    def session(self, parsed: Any, headers: Mapping[str, str]) -> str | None:
        given = headers.get("x-session-id") or headers.get("x-claude-code-session-id")
        if given:
            return given
        metadata = parsed.data.get("metadata")
        user = metadata.get("user_id") if type(metadata) is dict else None
        return user if type(user) is str and user else None

    def error_response(self, error: GatewayError, request_id: str) -> tuple[int, bytes]:
        status, kind = anthropic_error(error.status)
        detail: dict[str, Any] = {"type": kind, "message": error.message}
        if error.extra:  # a guardrail's block: which one, and what it found (SPEC §11)
            detail.update(error.extra)
        return status, orjson.dumps({"type": "error", "error": detail, "request_id": request_id})

    def error_event(self, error: GatewayError) -> bytes:
        return error_event(anthropic_error(error.status)[1], error.message)

    def adapt(self, provider: Provider, metrics: Metrics | None = None) -> Provider:
        return provider.native_messages() or ConvertedMessages(provider, metrics)


class CountTokensApi(MessagesApi):
    """`POST /v1/messages/count_tokens`: a Messages body that needs no `max_tokens`."""

    name = "count_tokens"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> MessagesRequest:
        return parse_messages_request(
            body, version=anthropic_header(headers, "anthropic-version"),
            beta=anthropic_header(headers, "anthropic-beta"), count_only=True,
        )


MESSAGES = MessagesApi()
COUNT_TOKENS = CountTokensApi()


def anthropic_header(headers: Mapping[str, str], name: str) -> str | None:
    """A header forwarded to an Anthropic upstream: printable ASCII (its values are), else 400."""
    value = headers.get(name)
    if value is not None and not (value.isascii() and value.isprintable()):
        raise invalid_value(name, f"The `{name}` header must be printable ASCII.")
    return value


def anthropic_error(status: int) -> tuple[int, str]:
    """The status and error type a Messages client gets for the gateway's `status`."""
    found = ERROR_TYPES.get(status)
    if found is not None:
        return found
    return (status, "invalid_request_error") if status < 500 else (500, "api_error")


@dataclasses.dataclass(frozen=True, slots=True)
class _Rendering:
    """What turning an OpenAI answer back into the client's message needs."""

    model: str  # the name the client asked for: Claude Code shows and matches on it
    tool_names: Mapping[str, str]
    stop_sequences: tuple[str, ...]
    input_tokens: int  # message_start's figure before the upstream reports one


class ConvertedMessages:
    """`provider` serving Messages clients through a chat completion, both ways (reference §7.4-7.6)."""

    def __init__(self, provider: Provider, metrics: Metrics | None) -> None:
        self.config = provider.config
        self._provider = provider
        self._metrics = metrics

    def prepare(self, call: Outbound, upstream_model: str) -> Prepared:
        messages, model = call.messages, call.model
        assert messages is not None and model is not None
        converted = to_openai(messages.data, model=upstream_model)
        if self._metrics is not None:
            for param in converted.dropped:
                self._metrics.conversion_dropped((self.config.name, param)).inc()
        # the chat request as a client that did not ask for the usage chunk: the provider adds it
        # where its upstream can send it (and takes it out of the stream, usage read)
        data = {k: v for k, v in converted.data.items() if k != "stream_options"}
        view = _ChatView(ChatRequest(data), model, call.request_id, converted.body)
        inner = self._provider.prepare(view, upstream_model)
        rendering = _Rendering(
            model=messages.model, tool_names=converted.tool_names, stop_sequences=converted.stop_sequences,
            input_tokens=max(1, len(converted.body) // 4),
        )
        return dataclasses.replace(inner, client=rendering)

    async def send(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange:
        return await self._provider.send(account, prepared, request_id)

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        return self._provider.classify(status, headers, body, now, wall_now=wall_now)

    def relay(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        """The provider's OpenAI-shaped caller fault in Anthropic's shape, its message kept."""
        relayed, out = self._provider.relay(status, headers, body)
        message = _openai_message(relayed) or f"The upstream provider refused the request (status {status})."
        out["Content-Type"] = "application/json"
        _, kind = anthropic_error(status)
        return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}}), out

    def answer(self, body: bytes, prepared: Prepared) -> Answer:
        rendering: _Rendering = prepared.client
        inner = self._provider.answer(body, prepared)
        message = to_anthropic_answer(
            inner.body, model=rendering.model, tool_names=rendering.tool_names,
            stop_sequences=rendering.stop_sequences,
        )
        return Answer(body=message.body, usage=inner.usage)

    def stream(self, prepared: Prepared) -> StreamReader:
        rendering: _Rendering = prepared.client
        outer = MessagesStream(
            model=rendering.model, tool_names=rendering.tool_names, input_tokens=rendering.input_tokens
        )
        return _Converting(self._provider.stream(prepared), outer)

    async def probe(self, account: AccountConfig) -> bool:
        return await self._provider.probe(account)

    def native_messages(self) -> None:
        return None

    async def close(self) -> None:
        return None  # the provider is closed by whoever built it


class _ChatView:
    """The converted request as the provider reads a chat request (`upstream.Outbound`)."""

    __slots__ = ("chat", "model", "request_id", "_body")

    messages = None

    def __init__(self, chat: ChatRequest, model: ModelConfig, request_id: str, body: bytes) -> None:
        self.chat = chat
        self.model = model
        self.request_id = request_id
        self._body = body

    def upstream_request(self, upstream_model: str, *, ask_usage: bool = True) -> bytes:
        # built for `upstream_model`, usage asked for on streams: only an upstream that cannot
        # take `stream_options` gets it without (the stream is then settled on its reservation)
        if ask_usage or not self.chat.stream:
            return self._body
        return orjson.dumps(self.chat.data)

    def upstream_messages(self, upstream_model: str) -> bytes:
        raise AssertionError("a converted request has no Messages body")


class _Converting:
    """The provider's OpenAI stream, then Anthropic's events made of it (`upstream.StreamReader`)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, inner: StreamReader, outer: MessagesStream) -> None:
        self._inner = inner
        self._outer = outer

    @property
    def done(self) -> bool:
        return self._outer.done

    @property
    def usage(self) -> Any:
        usage = self._inner.usage
        return usage if usage is not None else self._outer.usage

    def feed(self, chunk: bytes) -> bytes:
        inner = self._inner
        data = inner.feed(chunk)
        if not data:
            return b""
        self._outer.take_usage(inner.usage)  # before [DONE] reaches it: message_delta carries it
        try:
            return self._outer.feed(data)
        except MessagesStreamError as exc:
            raise InBandError(IN_BAND, str(exc)) from None
        except ValueError as exc:
            raise UpstreamFailure("bad_response", str(exc)) from None


def _openai_message(body: bytes) -> str | None:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = document.get("error") if type(document) is dict else None
    message = error.get("message") if type(error) is dict else None
    return message if type(message) is str and message else None
