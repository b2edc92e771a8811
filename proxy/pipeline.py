"""The request path of `POST /v1/chat/completions` and `POST /v1/messages`, top to bottom in one place.

authenticate → read body → validate → authorize → guardrails → admit (limits, budget) → forward
(schedule, failover, relay) → settle (limits, metrics, access log).
Each stage fills fields of the `Call` or raises `GatewayError`; errors are rendered here, once.
What differs per client API (its body, its errors, how providers serve it) is the `ClientApi`
the route names (`chat_api`, `messages_api`); every stage is the same for both.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import errors
from .admission import admit, settle_limits
from .call import Call
from .chat_api import CHAT
from .clientapi import ClientApi
from .count_tokens import count_tokens
from .cost import usd
from .errors import GatewayError
from .forward import forward
from .guardrails.stage import guard_request
from .messages_api import COUNT_TOKENS, MESSAGES
from .metrics import Metrics
from .state import STATE, ServerState

log = logging.getLogger("llm_proxy.pipeline")

# Request ids: unique per process start (random prefix) and per request (a counter), with no
# system call on the request path.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()

# Refusals made before any upstream attempt that another replica, or a moment, can turn around.
RETRY_CAN_HELP = frozenset({"draining", "circuit_open", "ratelimit_unavailable"})


async def handle_chat(request: web.Request) -> web.StreamResponse:
    return await handle(request, CHAT)


async def handle_messages(request: web.Request) -> web.StreamResponse:
    return await handle(request, MESSAGES)


async def handle_count_tokens(request: web.Request) -> web.StreamResponse:
    return await handle(request, COUNT_TOKENS, count_tokens)


async def admit_and_forward(call: Call, request: web.Request) -> web.StreamResponse:
    """What a request does once authorized: admitted by limits and budget, then forwarded."""
    await admit(call)
    return await forward(call, request)


Serve = Callable[[Call, web.Request], Awaitable[web.StreamResponse]]


async def handle(request: web.Request, api: ClientApi, serve: Serve = admit_and_forward) -> web.StreamResponse:
    state = request.app[STATE]
    call = Call(gateway=state.gateway, request_id=request_id_of(request), started=time.perf_counter(), api=api)
    task = request.task  # the task running this handler: what a drain cancels
    state.enter(task, call)
    response: web.StreamResponse | None = None
    try:
        if state.draining:
            raise errors.draining()
        authenticate(call, request)
        call.body = await read_body(request, state.server.max_body_bytes, state.server.body_timeout_s, call.request_id)
        validate(call, request)
        authorize(call)
        await guard_request(call)
        response = await serve(call, request)  # count_tokens: counted, never admitted or charged
        return response
    except GatewayError as exc:
        response = render_error(call, exc)
        return response
    except asyncio.CancelledError:
        call.status = 499  # the client went away (or shutdown ended the request)
        raise
    except Exception:
        log.exception("unexpected error handling request %s", call.request_id)
        response = render_error(call, errors.internal_error())
        return response
    finally:
        state.leave(task)
        settle(call, response, state)


def authenticate(call: Call, request: web.Request) -> None:
    token = presented_key(request)
    key = call.gateway.authenticate(token) if token else None
    if key is None:
        raise errors.invalid_api_key()
    call.key = key


def presented_key(request: web.Request) -> str:
    """The key the client sent (Bearer, else `x-api-key`); "" when absent or not UTF-8 text."""
    return utf8_or_empty(bearer_token(request) or request.headers.get("x-api-key", ""))


def utf8_or_empty(text: str) -> str:
    """aiohttp decodes header bytes that are not UTF-8 with surrogate escapes: no key is that."""
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return ""
    return text


async def read_body(request: web.Request, limit: int, idle_s: float = 60.0, request_id: str = "") -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit`, and with 408
    when it pauses for more than `idle_s` between two reads."""
    length = request.content_length
    if length is not None and length > limit:
        raise errors.request_too_large(limit)
    try:
        if request.content.is_eof():  # the usual case: it came with the head, nothing to wait for
            return await request.read()
        return await _read_paced(request, limit, idle_s, request_id)
    except web.HTTPRequestEntityTooLarge:
        raise errors.request_too_large(limit) from None
    except web.RequestPayloadError:
        # The client's framing or Content-Encoding is broken: its fault, not the gateway's. Ended
        # here, the body is not drained again by aiohttp (which would log the error once more).
        request.content.feed_eof()
        raise errors.malformed_request("the body cannot be read as its headers describe it") from None


async def _read_paced(request: web.Request, limit: int, idle_s: float, request_id: str) -> bytes:
    """A body still arriving, read as it comes under a deadline moved by each read."""
    content = request.content
    parts: list[bytes] = []
    size = 0
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(idle_s) as deadline:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    raise errors.request_too_large(limit)
                parts.append(chunk)
                deadline.reschedule(loop.time() + idle_s)
    except TimeoutError:
        log.warning("request %s: its body paused for more than %gs; answered 408", request_id, idle_s)
        raise errors.body_timeout(idle_s) from None
    return b"".join(parts)


def validate(call: Call, request: web.Request) -> None:
    parsed = call.api.parse(call.body, request.headers)
    call.parsed = parsed
    if parsed.request_id is not None and "X-Request-Id" not in request.headers:
        call.request_id = parsed.request_id
    call.session = call.api.session(parsed, request.headers)


def authorize(call: Call) -> None:
    assert call.parsed is not None and call.key is not None
    name = call.parsed.model
    model = call.gateway.models.get(name)
    if model is None:
        raise errors.model_not_found(name)
    if call.key.models is not None and name not in call.key.models:
        raise errors.model_not_allowed(name)
    if model.kind != "chat":
        raise errors.model_not_chat(name, model.kind)
    call.model = model


def render_error(call: Call, error: GatewayError) -> web.Response:
    """The error as the client's API shapes it; logged with the status the client got."""
    call.error_type = error.code
    headers = call.response_headers(error.headers())
    advice = retry_advice(call, error)
    if advice is not None:
        headers["x-should-retry"] = advice
    status, body = call.api.error_response(error, call.request_id)
    call.status = status
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def retry_advice(call: Call, error: GatewayError) -> str | None:
    """`x-should-retry`, which the official SDKs obey over their own rules (retry 408, 409, 429
    and 5xx, twice by default): "false" once an upstream attempt was made, since the gateway has
    already failed over and a client's retry would multiply `max_attempts` and bypass the retry
    budget; "true" where retrying can help though nothing was tried; else the client decides."""
    if call.attempts:
        return "false"
    if error.code in RETRY_CAN_HELP:
        return "true"
    return None


def settle(call: Call, response: web.StreamResponse | None, state: ServerState) -> None:
    """Accounts for the finished request: the access log line (never a key or content)."""
    if not call.status and response is not None:
        call.status = response.status
    settle_limits(call)
    duration = time.perf_counter() - call.started
    ttft = call.first_byte_at - call.started if call.first_byte_at is not None else None
    if call.gateway.metrics is not None:
        _record_metrics(call, call.gateway.metrics, duration, ttft)
    if state.access_log is None:
        return
    parsed = call.parsed
    state.access_log.write(
        {
            "request_id": call.request_id,
            "api": call.api.name,
            "key": call.key.name if call.key is not None else None,
            "model": parsed.model if parsed is not None else None,
            "provider": call.provider,
            "provider_type": call.provider_type,
            "account": call.account,
            "attempts": call.attempts,
            "status": call.status,
            "error_type": call.error_type,
            "prompt_tokens": call.prompt_tokens,
            "completion_tokens": call.completion_tokens,
            "cost_usd": usd(call.cost_nano),
            "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
            "duration_ms": round(duration * 1000, 3),
            "stream": parsed.stream if parsed is not None else False,
            "guardrails": call.guardrails,
        }
    )


def _record_metrics(call: Call, metrics: Metrics, duration: float, ttft: float | None) -> None:
    model = call.model.name if call.model is not None else "unknown"
    key = call.key.name if call.key is not None else "unknown"
    stream = call.parsed is not None and call.parsed.stream
    api = call.api.name
    metrics.record_request(
        api=api, model=model, key=key, status=call.status, error_type=call.error_type or "",
        stream=stream, duration_s=duration, upstream_s=call.upstream_s,
    )
    metrics.record_tokens(api=api, model=model, key=key, prompt=call.prompt_tokens, completion=call.completion_tokens)
    if ttft is not None:
        metrics.ttft((api, model, call.provider or "")).observe(ttft)


def bearer_token(request: web.BaseRequest) -> str:
    header = request.headers.get("Authorization")
    if header is not None and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return ""


def request_id_of(request: web.BaseRequest) -> str:
    """The client's `X-Request-Id` when it is usable, else a new `req_...`."""
    given = request.headers.get("X-Request-Id")
    if given and len(given) <= 200 and given.isprintable():
        return given
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER):010x}"

