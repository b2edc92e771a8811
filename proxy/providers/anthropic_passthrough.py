"""Clients of the Messages API served by an `anthropic` provider: their bytes passed through.

The request goes to `{base_url}/v1/messages` as the client sent it, only `model` spliced in when
the target's name differs, with the client's `anthropic-version` and `anthropic-beta` (the
provider's own beta values added); answers, errors and streams come back as they came. Only
reads what settlement needs (usage, from `message_start` and `message_delta`) and where a stream
may commit: `message_start` and `ping` are held, so an `event: error` right after them still
fails over (SPEC §10). Shares the provider's transport and classification.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from ..config import AccountConfig, ProviderConfig
from ..faults import Verdict
from ..httpmessage import UpstreamFailure
from ..streaming import SseScanner, event_end, event_json, event_start
from ..upstream import Answer, Exchange, InBandError, Outbound, Prepared, StreamReader
from .anthropic_answer import openai_usage
from .anthropic_errors import ERROR_STATUSES, classify_in_band, upstream_request_id
from .openai import json_object
from .transport import header_value

if TYPE_CHECKING:
    from .anthropic import AnthropicProvider

_HELD = frozenset({"message_start", "ping"})


def anthropic_headers(config: ProviderConfig, *, version: str | None, beta: str | None) -> bytes:
    """The `anthropic-version` line (the client's, else the provider's) and `anthropic-beta` (the
    provider's values, then the client's not among them)."""
    lines = b"anthropic-version: " + header_value(version or config.anthropic_version) + b"\r\n"
    values = list(config.anthropic_beta)
    for value in (beta or "").split(","):
        value = value.strip()
        if value and value not in values:
            values.append(value)
    if values:
        lines += b"anthropic-beta: " + header_value(",".join(values)) + b"\r\n"
    return lines


class AnthropicPassThrough:
    """`upstream.Provider` for Messages clients, on `provider`'s transport."""

    def __init__(self, provider: AnthropicProvider) -> None:
        self.config = provider.config
        self._provider = provider
        self._messages = provider.transport.target("/v1/messages")
        self._count = provider.transport.target("/v1/messages/count_tokens")
        self._default_headers = anthropic_headers(provider.config, version=None, beta=None)

    def prepare(self, call: Outbound, upstream_model: str) -> Prepared:
        messages = call.messages
        assert messages is not None
        headers = (
            self._default_headers
            if messages.version is None and messages.beta is None
            else anthropic_headers(self.config, version=messages.version, beta=messages.beta)
        )
        return Prepared(body=call.upstream_messages(upstream_model), stream=messages.stream, headers=headers)

    async def send(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange:
        return await self._provider.transport.post(
            account, self._messages, prepared.body, request_id, prepared.headers
        )

    async def count_tokens(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange:
        """`POST /v1/messages/count_tokens` with `prepared` (a count_tokens body)."""
        return await self._provider.transport.post(account, self._count, prepared.body, request_id, prepared.headers)

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        return self._provider.classify(status, headers, body, now, wall_now=wall_now)

    def relay(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        """Unchanged: Claude Code's recovery reads the upstream's wording (reference §7.1)."""
        relayed = {"Content-Type": headers.get("Content-Type", "application/json")}
        request_id = upstream_request_id(headers, body)
        if request_id is not None:
            relayed["x-upstream-request-id"] = request_id
        return body, relayed

    def answer(self, body: bytes, prepared: Prepared) -> Answer:
        raw = json_object(body).get("usage")
        return Answer(body=body, usage=openai_usage(raw) if type(raw) is dict else None)

    def stream(self, prepared: Prepared) -> StreamReader:
        return MessagesRelay()

    async def probe(self, account: AccountConfig) -> bool:
        return await self._provider.probe(account)

    def native_messages(self) -> AnthropicPassThrough:
        return self

    async def close(self) -> None:
        return None  # the provider owns the transport


class MessagesRelay(SseScanner):
    """An Anthropic stream relayed as it comes (`upstream.StreamReader`).

    Events are relayed whole and unchanged: `SseScanner`'s framing, with `message_stop` as the
    end. Until the first content event, `message_start` and `ping` are held (the client's
    response commits at it) and an `event: error` fails over; after it, an `event: error` is
    relayed as the upstream sent it and ends the stream. `usage` in OpenAI's figures, from
    message_start's counters updated by message_delta's (cumulative; some upstreams repeat the
    input counts there). A raw line feed cannot occur inside a JSON string, so an event line
    followed by one is never text that merely mentions it: each chunk is searched once per
    marker, and only the events before the commit are looked into.
    """

    __slots__ = ("committed", "_waiting", "_counts", "_error")

    END = b"event: message_stop\n"
    ERROR = b"event: error\n"
    # the same lines in a stream framed with CRLF, as SSE allows
    CRLF_END = b"event: message_stop\r\n"
    CRLF_ERROR = b"event: error\r\n"

    def __init__(self) -> None:
        super().__init__(strip_usage=False)
        self.committed = False
        self._waiting: list[bytes] = []
        self._counts: dict[str, Any] = {}  # Anthropic's usage counters, as last reported
        self._error = self.ERROR  # the error line to look for: LF, or CRLF once seen

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        data = super().feed(chunk)
        if not data:
            return b""
        if not self.committed:
            data = self._until_content(data)
            if not data:
                return b""
        if self._error is self.CRLF_ERROR and not self.done and data.find(self.CRLF_END) >= 0:
            self.done = True
        found = data.find(self._error)
        if found >= 0 and (found == 0 or data[found - 1] == 0x0A):
            end = event_end(data, found, len(data))
            raise _in_band(data[found:end], tail=data[:end])
        return data

    def _until_content(self, data: bytes) -> bytes:
        """Holds message_start and pings; the held events and the rest from the first other one."""
        start, size = 0, len(data)
        if data.find(b"\r\n", 0, 64) >= 0:
            self._error = self.CRLF_ERROR
        while start < size:
            end = event_end(data, start, size)
            event = data[start:end]
            kind = _event_type(event)
            if kind not in _HELD:
                if kind == "error":
                    raise _in_band(event, tail=b"")
                self.committed = True
                held, self._waiting = self._waiting, []
                return b"".join((*held, data[start:]))
            self._waiting.append(event)
            start = end
        return b""

    def _take_usage(self, data: bytes) -> bytes:
        """message_start's `message.usage`, then message_delta's `usage` over it."""
        start, size = 0, len(data)
        while (found := data.find(b'"usage"', start)) >= 0:
            begin = event_start(data, start, found)
            start = event_end(data, found, size)
            payload = event_json(data[begin:start])
            if type(payload) is not dict:
                continue
            usage = payload.get("usage")
            if usage is None and type(payload.get("message")) is dict:
                usage = payload["message"].get("usage")
            if type(usage) is dict:
                self._counts.update((k, v) for k, v in usage.items() if v is not None)
                self.usage = openai_usage(self._counts)
        return data


def _event_type(event: bytes) -> str | None:
    """An event's name: its `event:` line, else its data's `type`."""
    for line in event.splitlines():
        if line.startswith(b"event:"):
            return line[6:].strip().decode(errors="replace")
    payload = event_json(event)
    kind = payload.get("type") if type(payload) is dict else None
    return kind if type(kind) is str else None


def _in_band(event: bytes, *, tail: bytes) -> InBandError:
    """The upstream's `event: error`, classified as the answer its type stands for."""
    payload = event_json(event)
    if type(payload) is not dict:
        raise UpstreamFailure("bad_response", "an error event that is not a JSON object")
    error = payload.get("error")
    kind = error.get("type") if type(error) is dict else None
    status = ERROR_STATUSES.get(kind, 500) if type(kind) is str else 500
    verdict = classify_in_band(status, orjson.dumps(payload), asyncio.get_running_loop().time())
    return InBandError(verdict, f"anthropic {kind or 'error'} in the stream", tail=tail)
