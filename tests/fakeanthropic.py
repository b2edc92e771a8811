"""A fake Anthropic Messages API: a real aiohttp application answering from scripted replies.

It speaks what Anthropic documents: `POST /v1/messages` as JSON or as SSE with `event:` lines
(message_start, ping, content_block_start/delta/stop, message_delta, message_stop), Anthropic's
error shape with `request-id`, `retry-after` and `anthropic-ratelimit-*` headers, in-band
`event: error`, `POST /v1/messages/count_tokens` and `GET /v1/models`. It checks a request as
Anthropic does (an API key in x-api-key or as a Bearer token, an anthropic-version, the required
fields, no unknown top-level field) and records the exact bytes and headers of every request.

    fake = FakeAnthropic()
    fake.script(Reply(content=[text("Hi"), tool_use("toolu_1", "now", {})], stop_reason="tool_use"))
    server = await aiohttp_server(fake.app())
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .fakes import Received, Scripted

API_KEY = "sk-ant-fake"
# The Messages API's documented top-level request fields; anything else is "Extra inputs".
REQUEST_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
    "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "output_config",
    "service_tier", "container", "mcp_servers", "context_management", "inference_geo",
})


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def tool_use(tool_id: str, name: str, tool_input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input}


def thinking(value: str, signature: str = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds") -> dict[str, Any]:
    return {"type": "thinking", "thinking": value, "signature": signature}


def redacted_thinking(data: str) -> dict[str, Any]:
    return {"type": "redacted_thinking", "data": data}


def usage(
    input_tokens: int = 12, output_tokens: int = 5, *, cache_read: int = 0, cache_write: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
    }


@dataclass
class Reply:
    """A 200 answer, as JSON or as a stream (whichever the request asked for)."""

    content: list[dict[str, Any]] = field(default_factory=lambda: [text("Hello there")])
    stop_reason: str | None = "end_turn"
    stop_sequence: str | None = None
    usage: dict[str, Any] = field(default_factory=usage)
    model: str | None = None  # None: the request's model
    headers: dict[str, str] = field(default_factory=dict)
    piece: int = 8  # characters per text, thinking and input_json delta
    error_after: int | None = None  # stream: `event: error` after this many events
    error: tuple[str, str] = ("overloaded_error", "Overloaded")
    cut_after: int | None = None  # stream: the connection ends after this many events
    # stream: the error (or the cut) waits for this, e.g. until the client has seen content
    hold: asyncio.Event | None = None
    full_delta_usage: bool = False  # message_delta repeats the input and cache counters


@dataclass
class ErrorReply:
    """A non-2xx answer in Anthropic's error shape (or `body` verbatim, e.g. an HTML page)."""

    status: int
    type: str = "api_error"
    message: str = "Internal server error"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


class FakeAnthropic(Scripted["Reply | ErrorReply"]):
    def __init__(self, *, api_keys: tuple[str, ...] = (API_KEY,)) -> None:
        super().__init__(Reply())
        self.api_keys = api_keys
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._record_only)
        return app

    async def _record_only(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        return self._error(ErrorReply(404, "not_found_error", f"Not found: {request.path}"))

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        refusal = self._check(received)
        if refusal is not None:
            return self._error(refusal)
        body = received.json
        reply = self.next_reply()
        if isinstance(reply, ErrorReply):
            return self._error(reply)
        message = self._message(reply, body["model"])
        if body.get("stream") is True:
            return await self._stream(request, reply, message)
        return web.Response(body=orjson.dumps(message), headers=self._headers(reply.headers, "application/json"))

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        refusal = self._check(received, count=True)
        if refusal is not None:
            return self._error(refusal)
        return web.json_response({"input_tokens": max(1, len(received.body) // 4)}, headers=self._headers({}))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        if not self._authorized(received):
            return self._error(ErrorReply(401, "authentication_error", "invalid x-api-key"))
        model = {"type": "model", "id": "claude-fake-1", "display_name": "Claude Fake", "created_at": "2025-01-01T00:00:00Z"}
        page = {"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]}
        return web.json_response(page, headers=self._headers({}))

    def _authorized(self, received: Received) -> bool:
        """`x-api-key`, or `Authorization: Bearer` (how SDK 2.x sends an API key)."""
        bearer = received.headers.get("authorization", "")
        key = received.headers.get("x-api-key") or (bearer[7:] if bearer.startswith("Bearer ") else None)
        return key in self.api_keys

    def _check(self, received: Received, *, count: bool = False) -> ErrorReply | None:
        """What Anthropic would refuse before generating anything."""
        if not self._authorized(received):
            return ErrorReply(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in received.headers:
            return ErrorReply(400, "invalid_request_error", "anthropic-version: header is required")
        try:
            body = received.json
        except orjson.JSONDecodeError:
            return ErrorReply(400, "invalid_request_error", "There was an error parsing the body.")
        if type(body) is not dict:
            return ErrorReply(400, "invalid_request_error", "The request body must be an object.")
        extra = sorted(set(body) - REQUEST_FIELDS)
        if extra:
            return ErrorReply(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
        required = ("model", "messages") if count else ("model", "messages", "max_tokens")
        for name in required:
            if name not in body:
                return ErrorReply(400, "invalid_request_error", f"{name}: Field required")
        if type(body["messages"]) is not list or not body["messages"]:
            return ErrorReply(400, "invalid_request_error", "messages: at least one message is required")
        return None

    def _headers(self, extra: dict[str, str], content_type: str | None = None) -> dict[str, str]:
        headers = {"request-id": f"req_fake{next(self._ids):06d}", **extra}
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    def _error(self, reply: ErrorReply) -> web.Response:
        headers = self._headers(reply.headers)
        if reply.body is not None:
            return web.Response(status=reply.status, body=reply.body, headers={"Content-Type": "text/html", **headers})
        body = {"type": "error", "error": {"type": reply.type, "message": reply.message}, "request_id": headers["request-id"]}
        return web.Response(status=reply.status, body=orjson.dumps(body), headers={"Content-Type": "application/json", **headers})

    def _message(self, reply: Reply, model: str) -> dict[str, Any]:
        return {
            "id": f"msg_fake{len(self.requests):04d}",
            "type": "message",
            "role": "assistant",
            "model": reply.model or model,
            "content": reply.content,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": reply.usage,
        }

    async def _stream(self, request: web.Request, reply: Reply, message: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers=self._headers(reply.headers, "text/event-stream; charset=utf-8"))
        await response.prepare(request)
        for n, event in enumerate(stream_events(reply, message)):
            if reply.hold is not None and n in (reply.error_after, reply.cut_after):
                await reply.hold.wait()
            if n == reply.error_after:
                error_type, error_message = reply.error
                event = {"type": "error", "error": {"type": error_type, "message": error_message}}
            if n == reply.cut_after:
                break
            await response.write(sse(event))
            if event["type"] == "error":
                break
        await response.write_eof()
        return response


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def stream_events(reply: Reply, message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events Anthropic streams for `message`."""
    start_usage = {**reply.usage, "output_tokens": 1}
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {**message, "content": [], "stop_reason": None,
                                              "stop_sequence": None, "usage": start_usage}},
        {"type": "ping"},
    ]
    for index, block in enumerate(reply.content):
        events.extend(_block_events(index, block, reply.piece))
    delta_usage = dict(reply.usage) if reply.full_delta_usage else {"output_tokens": reply.usage["output_tokens"]}
    events.append({"type": "message_delta", "delta": {"stop_reason": reply.stop_reason,
                                                      "stop_sequence": reply.stop_sequence}, "usage": delta_usage})
    events.append({"type": "message_stop"})
    return events


def _pieces(value: str, size: int) -> list[str]:
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def _block_events(index: int, block: dict[str, Any], piece: int) -> list[dict[str, Any]]:
    kind = block["type"]
    if kind == "text":
        start: dict[str, Any] = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": part} for part in _pieces(block["text"], piece)]
    elif kind == "tool_use":
        start = {**block, "input": {}}
        arguments = orjson.dumps(block["input"]).decode() if block["input"] else ""
        deltas = [{"type": "input_json_delta", "partial_json": part} for part in _pieces(arguments, piece)]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": part} for part in _pieces(block["thinking"], piece)]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start, deltas = block, []
    return [
        {"type": "content_block_start", "index": index, "content_block": start},
        *({"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas),
        {"type": "content_block_stop", "index": index},
    ]
