"""A fake Azure OpenAI resource: a real aiohttp application answering from scripted replies.

It speaks what Azure documents and what its users recorded (reference §5): chat completions at
`/openai/deployments/{deployment}/chat/completions?api-version=…` and at `/openai/v1/chat/completions`
(the deployment in the body's `model`), the key in `api-key`, `GET /openai/models?api-version=…`
and `GET /openai/v1/models`; answers carry `prompt_filter_results` and per-choice
`content_filter_results`; streams open with the empty-`choices` prompt-filter event
(`"id":""`, `"created":0`) and, with the asynchronous filter, carry chunks whose choice has
`content_filter_offsets` but no `delta`; errors are Azure's (`"code":"429"` as a string,
`DeploymentNotFound`, the prompt filter's 400 with `innererror`). Every request is recorded
with its exact target (path and query), headers and bytes. `FILTER_CHUNKS` and `KEPT_CHUNKS` are
single events as Azure streams them, for tests of the stream normaliser without a server.

    fake = FakeAzure(deployments={"gpt4o-prod": "gpt-4o-2024-08-06"})
    fake.script(Reply(content="Hi"), ErrorReply.rate_limited(headers={"retry-after": "6"}))
    server = await aiohttp_server(fake.app())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from .fakes import Received, Scripted

API_KEY = "azure-key-1"
API_KEY_2 = "azure-key-2"
DEPLOYMENT = "gpt4o-prod"
UNDERLYING = "gpt-4o-2024-08-06"  # the model DEPLOYMENT runs
API_VERSIONS = frozenset({"2024-06-01", "2024-10-21", "2025-01-01-preview"})
SAFE = {"filtered": False, "severity": "safe"}
CONTENT_FILTER = {"hate": SAFE, "self_harm": SAFE, "sexual": SAFE, "violence": SAFE}
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": {**CONTENT_FILTER, "jailbreak": {"filtered": False, "detected": False}}}]
CREATED = 1733000000


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\n\n"


# Single events as Azure streams them: the chunks OpenAI never sends, and the ones it does.
HEAD = {"id": "chatcmpl-AZ1", "object": "chat.completion.chunk", "created": CREATED, "model": UNDERLYING}
OFFSETS = {"check_offset": 0, "start_offset": 0, "end_offset": 12}
FILTER_CHUNKS = {
    "the prompt-filter first event": sse({"id": "", "object": "", "created": 0, "model": "",
                                          "prompt_filter_results": PROMPT_FILTER, "choices": []}),
    "empty choices, usage null": sse({**HEAD, "choices": [], "usage": None}),
    "the asynchronous filter's offsets": sse({**HEAD, "choices": [
        {"index": 0, "finish_reason": None, "content_filter_results": CONTENT_FILTER, "content_filter_offsets": OFFSETS}]}),
    "offsets for two choices, CRLF": sse({**HEAD, "choices": [
        {"index": 0, "content_filter_offsets": OFFSETS}, {"index": 1, "content_filter_offsets": OFFSETS}]}).replace(b"\n\n", b"\r\n\r\n"),
    "spaced JSON": b'data: {"id": "", "choices": [ ], "usage": null}\n\n',
}
KEPT_CHUNKS = {
    "the role chunk": sse({**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}),
    "content with filter results": sse({**HEAD, "choices": [
        {"index": 0, "delta": {"content": "Hi"}, "finish_reason": None, "content_filter_results": CONTENT_FILTER}]}),
    "the finish chunk": sse({**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    "a content_filter finish without delta": sse({**HEAD, "choices": [
        {"index": 0, "finish_reason": "content_filter", "content_filter_results": CONTENT_FILTER}]}),
    "the usage chunk": sse({**HEAD, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}),
    "one choice with a delta": sse({**HEAD, "choices": [
        {"index": 0, "content_filter_offsets": OFFSETS}, {"index": 1, "delta": {"content": "x"}, "finish_reason": None}]}),
    "an in-band error": sse({"error": {"code": "server_error", "message": "The server had an error"}}),
    "[DONE]": b"data: [DONE]\n\n",
    "a comment": b": keep-alive\n\n",
}


@dataclass
class Reply:
    """A 200 answer, as JSON or as a stream (whichever the request asked for)."""

    content: str | None = "Hello there"
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: tuple[int, int] = (9, 3)
    piece: int = 4  # characters per content delta
    async_filter: bool = True  # stream: a no-`delta` offsets chunk after each content delta
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ErrorReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def azure(
        cls, status: int, code: str, message: str, headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> ErrorReply:
        """Azure's error body: `code` a string (even "429"), no `type`; `extra` members after them."""
        return cls(status, orjson.dumps({"error": {"code": code, "message": message, **(extra or {})}}), headers or {})

    @classmethod
    def rate_limited(cls, message: str = "", headers: dict[str, str] | None = None) -> ErrorReply:
        message = message or (
            "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 "
            "have exceeded token rate limit of your current OpenAI S0 pricing tier."
        )
        return cls.azure(429, "429", message, headers)

    @classmethod
    def prompt_filtered(cls) -> ErrorReply:
        return cls.azure(
            400, "content_filter",
            "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
            "Please modify your prompt and retry.",
            extra={"param": "prompt", "status": 400, "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {**CONTENT_FILTER, "violence": {"filtered": True, "severity": "high"}},
            }},
        )


class FakeAzure(Scripted["Reply | ErrorReply"]):
    def __init__(self, *, deployments: dict[str, str], api_keys: tuple[str, ...] = (API_KEY,)) -> None:
        super().__init__(Reply())
        self.deployments = deployments  # deployment name -> the model it runs
        self.api_keys = api_keys  # the resource's keys (Azure gives two)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._classic)
        app.router.add_post("/openai/v1/chat/completions", self._v1)
        app.router.add_get("/openai/models", self._models)
        app.router.add_get("/openai/v1/models", self._models)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        return app

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        await self._receive(request)
        return _error(ErrorReply.azure(404, "404", "Resource not found"))

    async def _classic(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        if request.query.get("api-version") not in API_VERSIONS:
            return _error(ErrorReply.azure(404, "404", "Resource not found"))
        return await self._chat(request, received, request.match_info["deployment"])

    async def _v1(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        if "api-version" in request.query and request.query["api-version"] not in ("v1", "preview"):
            return _error(ErrorReply.azure(400, "BadRequest", "Invalid api-version for the v1 API"))
        model = _body(received).get("model")
        return await self._chat(request, received, model if type(model) is str else "")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        received = await self._receive(request)
        if request.path == "/openai/models" and request.query.get("api-version") not in API_VERSIONS:
            return _error(ErrorReply.azure(404, "404", "Resource not found"))
        if received.headers.get("api-key") not in self.api_keys:
            return _error(_denied())
        data = [{"id": model, "object": "model", "status": "succeeded"} for model in sorted(set(self.deployments.values()))]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request, received: Received, deployment: str) -> web.StreamResponse:
        if received.headers.get("api-key") not in self.api_keys:
            return _error(_denied())
        body = _body(received)
        if not body.get("messages"):
            return _error(ErrorReply.azure(400, "BadRequest", "'messages' is a required property", extra={"param": "messages"}))
        if deployment not in self.deployments:
            return _error(ErrorReply.azure(
                404, "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within "
                "the last 5 minutes, please wait a moment and try again.",
            ))
        reply = self.next_reply()
        if isinstance(reply, ErrorReply):
            return _error(reply)
        model = self.deployments[deployment]
        if body.get("stream") is True:
            options = body.get("stream_options") or {}
            return await _stream(request, reply, model, usage=options.get("include_usage") is True)
        return web.Response(body=orjson.dumps(_completion(reply, model)), headers={"Content-Type": "application/json", **reply.headers})


def _body(received: Received) -> dict[str, Any]:
    try:
        body = received.json
    except orjson.JSONDecodeError:
        return {}
    return body if type(body) is dict else {}


def _denied() -> ErrorReply:
    return ErrorReply.azure(
        401, "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid "
        "key for an active subscription and use a correct regional API endpoint for your resource.",
    )


def _error(reply: ErrorReply) -> web.Response:
    headers = {"Content-Type": "application/json", "apim-request-id": "c0ffee00-0000-4000-8000-000000000000", **reply.headers}
    return web.Response(status=reply.status, body=reply.body, headers=headers)


def _usage(reply: Reply) -> dict[str, Any]:
    prompt, completion = reply.usage
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}


def _completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    choice = {"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None,
              "content_filter_results": CONTENT_FILTER}
    return {"id": "chatcmpl-AZ1", "object": "chat.completion", "created": CREATED, "model": model,
            "system_fingerprint": "fp_azure", "prompt_filter_results": PROMPT_FILTER, "choices": [choice],
            "usage": _usage(reply)}


def stream_events(reply: Reply, model: str, *, usage: bool) -> list[bytes]:
    """The events Azure streams for `reply`, in order, each a whole `data:` event."""
    head = {"id": "chatcmpl-AZ1", "object": "chat.completion.chunk", "created": CREATED, "model": model,
            "system_fingerprint": "fp_azure"}
    tail = {"usage": None} if usage else {}

    def chunk(choice: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [{"index": 0, "finish_reason": None, "logprobs": None, **choice}], **head, **tail}

    events: list[dict[str, Any]] = [
        {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": PROMPT_FILTER},
        chunk({"delta": {"content": "", "refusal": None, "role": "assistant"}, "content_filter_results": {}}),
    ]
    text, offset = reply.content or "", 0
    for start in range(0, len(text), reply.piece):
        piece = text[start : start + reply.piece]
        events.append(chunk({"delta": {"content": piece}, "content_filter_results": CONTENT_FILTER}))
        offset += len(piece)
        if reply.async_filter:
            events.append({"choices": [{"index": 0, "finish_reason": None, "content_filter_results": CONTENT_FILTER,
                                        "content_filter_offsets": {"check_offset": 0, "start_offset": 0, "end_offset": offset}}],
                           **head})
    for index, call in enumerate(reply.tool_calls):
        arguments = call["function"]["arguments"]
        first = {**call, "index": index, "function": {"name": call["function"]["name"], "arguments": ""}}
        events.append(chunk({"delta": {"tool_calls": [first]}}))
        events.append(chunk({"delta": {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}}))
    events.append(chunk({"delta": {}, "finish_reason": reply.finish_reason, "content_filter_results": {}}))
    if usage:
        events.append({"choices": [], **head, "usage": _usage(reply)})
    return [b"data: " + orjson.dumps(event) + b"\n\n" for event in events] + [b"data: [DONE]\n\n"]


def client_view(events: list[bytes], *, usage: bool) -> bytes:
    """What an OpenAI client gets of `events`: no filter chunk, the usage chunk only if it asked."""
    kept = [e for e in events if not (b'"choices":[]' in e and b'"usage":{' not in e) and b'"content_filter_offsets"' not in e]
    return b"".join(e for e in kept if usage or b'"choices":[],' not in e)


async def start_resource(aiohttp_server: Any, deployments: dict[str, str] | None = None) -> tuple[FakeAzure, str]:
    """A fake resource on a real port with both keys, and its base_url (`…/openai`); it deploys
    DEPLOYMENT unless `deployments` says otherwise."""
    fake = FakeAzure(deployments={DEPLOYMENT: UNDERLYING} if deployments is None else deployments, api_keys=(API_KEY, API_KEY_2))
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("/openai"))


async def _stream(request: web.Request, reply: Reply, model: str, *, usage: bool) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", **reply.headers})
    await response.prepare(request)
    for event in stream_events(reply, model, usage=usage):
        await response.write(event)
    await response.write_eof()
    return response
