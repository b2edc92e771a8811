"""A fake Gemini OpenAI-compatible endpoint: a real aiohttp application answering from scripted replies.

It speaks the compatibility layer as its users recorded it (reference §6.1, B23):
`POST /v1beta/openai/chat/completions` and `GET /v1beta/openai/models` with
`Authorization: Bearer <key>`; tool calls with `"id": ""`; in streams, tool-call deltas without
`index`, each call whole in one fragment, and `finish_reason: "stop"` although the answer called
tools (in the tool call's chunk, or in a later one as newer models do); the usage on the last
chunk; errors in Google's shape (`code` an int, `status` a string such as RESOURCE_EXHAUSTED,
`details` with RetryInfo), sometimes wrapped in a list. Every request is recorded with its exact
target, headers and bytes.

    fake = FakeGemini()
    fake.script(Reply(tool_calls=[call("get_weather", '{"city":"Paris"}')]), GoogleError(429, "RESOURCE_EXHAUSTED", "..."))
    server = await aiohttp_server(fake.app())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .fakes import Received, Scripted

API_KEY = "gemini-key-1"
API_KEY_2 = "gemini-key-2"
MODELS = ("gemini-2.5-flash", "gemini-3.5-flash")
CREATED = 1733000000
SIGNATURE = {"google": {"thought_signature": "CiQB0e2Kb4sig"}}


def call(name: str, arguments: str, call_id: str = "", *, signed: bool = False) -> dict[str, Any]:
    """A tool call as Gemini sends it: `id` empty unless given, a thought signature if `signed`."""
    value: dict[str, Any] = {"function": {"arguments": arguments, "name": name}, "id": call_id, "type": "function"}
    if signed:
        value["extra_content"] = SIGNATURE
    return value


@dataclass
class Reply:
    content: str | None = "Hello there"
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"  # what Gemini says, tool calls or not
    usage: tuple[int, int] = (8, 4)
    piece: int = 5
    split_finish: bool = False  # stream: the finish comes in a chunk after the tool calls' (gemini-3.5)
    calls_per_chunk: int = 1  # stream: tool calls sent together in one delta


@dataclass
class GoogleError:
    status: int
    google_status: str
    message: str
    details: list[dict[str, Any]] = field(default_factory=list)
    wrapped: bool = True  # the list form `[{"error": ...}]`
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.status, "message": self.message, "status": self.google_status}
        if self.details:
            error["details"] = self.details
        document: Any = [{"error": error}] if self.wrapped else {"error": error}
        return orjson.dumps(document)


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def quota_failure(quota_id: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                            "quotaId": quota_id}]}


def error_info(reason: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com"}


class FakeGemini(Scripted["Reply | GoogleError"]):
    def __init__(self, *, api_keys: tuple[str, ...] = (API_KEY,)) -> None:
        super().__init__(Reply())
        self.api_keys = api_keys

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1beta/openai/chat/completions", self._chat)
        app.router.add_get("/v1beta/openai/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    def _authorized(self, received: Received) -> bool:
        bearer = received.headers.get("authorization", "")
        return bearer.startswith("Bearer ") and bearer[7:] in self.api_keys

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        return _error(GoogleError(404, "NOT_FOUND", "Requested entity was not found.", wrapped=False))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        if not self._authorized(received):
            return _error(_invalid_key())
        return web.json_response({"object": "list", "data": [{"id": f"models/{m}", "object": "model", "owned_by": "google"} for m in MODELS]})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        if not self._authorized(received):
            return _error(_invalid_key())
        body = orjson.loads(received.body)
        if body.get("model") not in MODELS:
            return _error(GoogleError(404, "NOT_FOUND", f"models/{body.get('model')} is not found for API version v1main"))
        if not body.get("messages"):
            return _error(GoogleError(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified"))
        reply = self.next_reply()
        if isinstance(reply, GoogleError):
            return _error(reply)
        if body.get("stream") is True:
            options = body.get("stream_options") or {}
            return await _stream(request, reply, body["model"], usage=options.get("include_usage") is True)
        return web.json_response(_completion(reply, body["model"]))


def _invalid_key() -> GoogleError:
    return GoogleError(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", [error_info("API_KEY_INVALID")])


def _error(reply: GoogleError) -> web.Response:
    return web.Response(status=reply.status, body=reply.body(), headers={"Content-Type": "application/json", **reply.headers})


def _usage(reply: Reply) -> dict[str, int]:
    prompt, completion = reply.usage
    return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}


def _completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"content": reply.content, "role": "assistant"}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return {"choices": [{"finish_reason": reply.finish_reason, "index": 0, "message": message}], "created": CREATED,
            "id": "gm-resp-1", "model": model, "object": "chat.completion", "usage": _usage(reply)}


def stream_events(reply: Reply, model: str, *, usage: bool) -> list[bytes]:
    """The events the compatibility layer streams for `reply`."""
    head = {"created": CREATED, "id": "gm-resp-1", "model": model, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice: dict[str, Any] = {"delta": {**delta, "role": "assistant"}, "index": 0}
        if finish is not None:
            choice["finish_reason"] = finish
        return {"choices": [choice], **head, **extra}

    text = reply.content or ""
    events = [chunk({"content": text[i : i + reply.piece]}) for i in range(0, len(text), reply.piece)]
    calls = reply.tool_calls
    groups = [calls[i : i + reply.calls_per_chunk] for i in range(0, len(calls), reply.calls_per_chunk)]
    for n, group in enumerate(groups):
        last = n == len(groups) - 1
        events.append(chunk({"tool_calls": group}, None if reply.split_finish or not last else reply.finish_reason))
    if not groups or reply.split_finish:
        events.append(chunk({"content": ""}, reply.finish_reason))
    if usage:
        events[-1]["usage"] = _usage(reply)
    return [b"data: " + orjson.dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]


async def _stream(request: web.Request, reply: Reply, model: str, *, usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in stream_events(reply, model, usage=usage):
        await response.write(event)
    await response.write_eof()
    return response
