"""The terminal stage: try accounts (then fallback models) until one answers, then relay it.

Nothing reaches the client before an attempt has succeeded far enough to commit: the whole
body for JSON, the first event for SSE. After that a failure ends the stream with one error
event. Every attempt is handed back to `Accounts.finish` exactly once, whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from . import errors
from .accounts import Attempt, Choice
from .admission import admit_account
from .call import Call
from .clock import Clock
from .config import ModelConfig
from .deadlines import deadline_at
from .errors import GatewayError
from .faults import Fault, Verdict
from .guardrails.answers import guard_answer, guard_stream
from .metrics import Metrics
from .upstream import Exchange, InBandError, Prepared, Provider, StreamReader, UpstreamFailure

log = logging.getLogger("llm_proxy.forward")

MAX_ERROR_BODY = 1 << 20
TRANSIENT = Verdict(Fault.TRANSIENT, reason="transient")
# No connection, or one closed before any answer: the provider's host, whichever account asked.
HOST_FAULT = Verdict(Fault.TRANSIENT, reason="transient", shared=True)
SUCCESS = Verdict(Fault.NONE)


async def forward(call: Call, request: web.Request) -> web.StreamResponse:
    """Attempts in order until one commits; the last failure when none does."""
    assert call.model is not None and call.key is not None
    gateway = call.gateway
    max_attempts = gateway.config.routing.max_attempts
    loop = asyncio.get_running_loop()
    failure: GatewayError | None = None
    refusal: GatewayError | None = None  # what a candidate's upstream could not express
    breaker_retry_at: float | None = None
    cooling_until: float | None = None
    prepared: dict[tuple[str, str], Prepared] = {}
    providers = gateway.surfaces[call.api.name]  # as they serve the client's API
    for model in gateway.routes[call.model.name]:
        first_on_model = True
        while call.attempts < max_attempts:
            now = loop.time()
            choice = gateway.accounts.choose(
                model=model, group=call.key.group, tried=call.tried, session=call.session, now=now
            )
            if choice.account is None:
                if choice.breaker_blocked and choice.retry_at is not None:
                    breaker_retry_at = min(breaker_retry_at or choice.retry_at, choice.retry_at)
                if choice.cooling_until is not None:
                    cooling_until = min(cooling_until or choice.cooling_until, choice.cooling_until)
                break
            assert choice.target is not None
            provider = providers[choice.target.provider]
            try:
                outgoing = _prepare(call, provider, choice.target.model, prepared)
            except GatewayError as exc:
                refusal = refusal or exc
                call.tried.append(choice.account)  # another provider type may express it
                continue
            if not await admit_account(call, choice.account.id):
                call.tried.append(choice.account)  # its own limit is spent: another account serves
                continue
            if call.attempts == 0:
                gateway.retry_budget.record_first(now)
            elif not gateway.retry_budget.try_retry(now):
                log.warning("retry refused by the retry budget (request %s)", call.request_id)
                assert failure is not None
                raise failure
            if gateway.metrics is not None:
                _count_retry_and_fallback(gateway.metrics, call, model, first_on_model)
            first_on_model = False
            call.served_model = model
            result = await _attempt(call, request, choice, provider, outgoing)
            if not isinstance(result, GatewayError):
                return result
            failure = result
    if failure is not None:
        raise failure
    if refusal is not None:
        raise refusal
    if breaker_retry_at is not None:
        raise errors.circuit_open(breaker_retry_at - loop.time())
    raise errors.no_account_available(max(1.0, (cooling_until or 0.0) - loop.time()))


def _prepare(
    call: Call, provider: Provider, upstream_model: str, prepared: dict[tuple[str, str], Prepared]
) -> Prepared:
    """The request as `provider` sends it for `upstream_model`, built once per request."""
    key = (provider.config.name, upstream_model)
    outgoing = prepared.get(key)
    if outgoing is None:
        outgoing = prepared[key] = provider.prepare(call, upstream_model)
    return outgoing


def _count_retry_and_fallback(metrics: Metrics, call: Call, model: ModelConfig, first_on_model: bool) -> None:
    if call.attempts:
        metrics.retries((call.provider or "", call.last_outcome)).inc()
    if first_on_model and model is not call.model:
        assert call.model is not None
        metrics.fallbacks((call.model.name, model.name)).inc()


async def _attempt(
    call: Call, request: web.Request, choice: Choice, provider: Provider, prepared: Prepared
) -> web.StreamResponse | GatewayError:
    """One upstream attempt: a committed response, or the error it ended with."""
    gateway = call.gateway
    loop = asyncio.get_running_loop()
    attempt = gateway.accounts.begin(choice, loop.time())
    call.attempts += 1
    call.tried.append(attempt.account)
    call.provider, call.account = attempt.account.provider.name, attempt.account.config.name
    call.provider_type = provider.config.type
    clock = Clock(provider.config.timeouts)
    verdict: Verdict | None = None
    result: web.StreamResponse | GatewayError | None = None
    exchange: Exchange | None = None
    started = time.perf_counter()
    try:
        try:
            async with clock.timer:
                exchange = await provider.send(attempt.account.config, prepared, call.request_id)
                if not 200 <= exchange.status < 300:
                    verdict, result = await _refused(call, provider, exchange, clock)
                    return result
                if not prepared.stream:
                    verdict, result = await _relay_json(call, provider, prepared, exchange, clock)
                    return result
                scanner = guard_stream(call, provider.stream(prepared), call.api.shape)
                first = await _first_event(exchange, clock, scanner)
        except TimeoutError:
            verdict, result = TRANSIENT, _failed(call, clock.expired())
            return result
        except UpstreamFailure as exc:
            error = errors.upstream_unreachable() if exc.kind == "connect" else errors.bad_upstream_response(exc.detail)
            verdict = HOST_FAULT if exc.kind in ("connect", "reset") else TRANSIENT
            result = _failed(call, error, exc.detail)
            return result
        except InBandError as exc:  # before commit: fails over like the status it stands for
            verdict = exc.verdict
            result = _failed(call, _error_for(verdict, exc.detail, clock.loop.time()), verdict.reason)
            return result
        call.first_byte_at = time.perf_counter()
        try:
            result = await _open_sse(call, request)
        except ConnectionResetError:
            # the client left before its first byte: end the request as a cancelled one
            raise asyncio.CancelledError from None
        verdict = await _pump(call, request, result, exchange, clock, scanner, first)
        return result
    finally:
        _settle_attempt(call, attempt, verdict, result, exchange, time.perf_counter() - started)


def _settle_attempt(
    call: Call, attempt: Attempt, verdict: Verdict | None, result: object, exchange: Exchange | None,
    elapsed: float,
) -> None:
    """Hands the attempt back, once, whatever happened: `verdict` None means it was cancelled."""
    gateway = call.gateway
    call.upstream_s += elapsed
    if exchange is not None:
        exchange.close()
    headers = exchange.headers if exchange is not None else None
    gateway.accounts.finish(
        attempt, verdict or SUCCESS, asyncio.get_running_loop().time(), cancelled=verdict is None, headers=headers
    )
    call.last_outcome = _outcome(verdict, result, call)
    if gateway.metrics is not None:
        gateway.metrics.record_attempt(
            provider=call.provider, account=call.account, outcome=call.last_outcome, duration_s=elapsed
        )


_OUTCOMES = {
    Fault.NONE: "success",
    Fault.CALLER: "caller_error",
    Fault.QUARANTINE: "auth_error",
    Fault.DISABLE: "quota_exhausted",
    Fault.COOLDOWN: "rate_limited",
}
_TRANSIENT_OUTCOMES = {"upstream_unreachable": "connect_error", "upstream_timeout": "timeout"}


def _outcome(verdict: Verdict | None, result: object, call: Call) -> str:
    """A bounded label for how an attempt ended."""
    if verdict is None:
        return "cancelled"
    if verdict.fault is not Fault.TRANSIENT:
        return _OUTCOMES[verdict.fault]
    code = result.code if isinstance(result, GatewayError) else call.error_type
    return _TRANSIENT_OUTCOMES.get(code or "", "bad_response")


def _failed(call: Call, error: GatewayError, detail: str = "") -> GatewayError:
    log.warning(
        "upstream attempt failed: %s %s/%s %s",
        error.code,
        call.provider,
        call.account,
        detail or error.message,
    )
    return error


async def _refused(
    call: Call, provider: Provider, exchange: Exchange, clock: Clock
) -> tuple[Verdict, web.StreamResponse | GatewayError]:
    """A non-2xx answer: relayed when it is the caller's fault, else this attempt's error."""
    body = await read_all(exchange, clock, MAX_ERROR_BODY)
    now = clock.loop.time()
    verdict = provider.classify(exchange.status, exchange.headers, body, now, wall_now=time.time())
    if verdict.fault is Fault.CALLER:
        relayed, headers = provider.relay(exchange.status, exchange.headers, body)
        response = web.Response(status=exchange.status, body=relayed, headers=call.response_headers(headers))
        return verdict, response
    error = _error_for(verdict, f"upstream status {exchange.status}", now)
    return verdict, _failed(call, error, verdict.reason)


def _error_for(verdict: Verdict, detail: str, now: float) -> GatewayError:
    """The answer to an attempt that failed with `verdict` (not a caller fault)."""
    if verdict.fault is Fault.TRANSIENT:
        return errors.bad_upstream_response(detail)
    return errors.no_account_available(max(1.0, (verdict.until or 0) - now))


async def read_all(exchange: Exchange, clock: Clock, limit: int | None = None) -> bytes:
    """The answer's body, each chunk due within `idle_s`; its first `limit` bytes or a little
    more when it is longer (`exchange.finished` is then false)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await exchange.read():
        parts.append(chunk)
        size += len(chunk)
        if exchange.finished or (limit is not None and size > limit):
            break
        clock.tick()  # more to come: due within idle_s (a body read in one go moves no timer)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def _relay_json(
    call: Call, provider: Provider, prepared: Prepared, exchange: Exchange, clock: Clock
) -> tuple[Verdict, web.StreamResponse | GatewayError]:
    try:
        answer = provider.answer(await read_all(exchange, clock), prepared)
    except ValueError as exc:
        return TRANSIENT, _failed(call, errors.bad_upstream_response(str(exc)))
    call.record_usage(answer.usage)
    call.first_byte_at = time.perf_counter()
    body = guard_answer(call, answer.body, call.api.shape)
    assert call.parsed is not None
    if call.parsed.request_id is not None:
        body = _with_request_id(body, call.parsed.request_id)
    headers = call.response_headers({"Content-Type": "application/json"})
    return SUCCESS, web.Response(body=body, headers=headers)


def _with_request_id(body: bytes, request_id: str) -> bytes:
    """`body` with `"request_id"` as its first member; every other byte unchanged."""
    brace = body.index(b"{") + 1
    member = b'"request_id":' + orjson.dumps(request_id)
    empty = body[brace:].lstrip().startswith(b"}")
    return body[:brace] + member + (b"" if empty else b",") + body[brace:]


async def _first_event(exchange: Exchange, clock: Clock, scanner: StreamReader) -> bytes:
    """Reads until the first whole event: the point where the client's response commits."""
    while True:
        chunk = await exchange.read()
        if not chunk:
            raise UpstreamFailure("bad_response", "stream ended before its first event")
        if first := scanner.feed(chunk):
            return first


async def _open_sse(call: Call, request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers=call.response_headers(
            {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    )
    await response.prepare(request)
    return response


async def _pump(
    call: Call,
    request: web.Request,
    response: web.StreamResponse,
    exchange: Exchange,
    clock: Clock,
    scanner: StreamReader,
    first: bytes,
) -> Verdict:
    """Relays a committed stream to its end; a failure becomes one terminal error event, and a
    client that stops taking bytes is dropped."""
    error: GatewayError | None = None
    verdict = TRANSIENT  # when an error ends it
    tail = b""  # the upstream's own end of the stream, when it is the client's protocol too
    try:
        await _relay_chunks(response, exchange, clock, scanner, first)
        if not scanner.done:
            error = errors.bad_upstream_response("stream ended before it was complete")
    except InBandError as exc:
        error, verdict, tail = errors.bad_upstream_response(exc.detail), exc.verdict, exc.tail
    except TimeoutError:
        if clock.client_since is not None:
            return _drop_client(call, request, clock)
        error = clock.expired()
    except UpstreamFailure as exc:
        error = errors.bad_upstream_response(exc.detail)
    except ConnectionResetError:
        call.status = 499
        return SUCCESS  # the client left; the caller closes the upstream
    except asyncio.CancelledError:
        if call.ended_by_shutdown:
            await _end_with(call, request, response, clock, errors.draining())
        raise
    finally:
        call.record_usage(scanner.usage)
    if error is None:
        verdict = SUCCESS
    else:
        call.error_type = error.code
        _failed(call, error)
    await _end_with(call, request, response, clock, error, tail)
    return verdict


async def _relay_chunks(
    response: web.StreamResponse, exchange: Exchange, clock: Clock, scanner: StreamReader, first: bytes
) -> None:
    """`first`, then every chunk to the end of the stream, under one deadline for them all.

    Nothing is re-armed per chunk: a chunk only notes when it came, a write when it began and
    ended, and when the deadline's time comes `Clock.due` says when it really is; a later time
    puts it back on the timer, interrupting nothing. So a pending read is cancelled only once
    the upstream has been silent for `idle_s`, and a write only once the client has taken
    nothing for `client_stall_s`: cancelling aiohttp's drain leaves the connection unusable
    (its next drain fails at once), so it is done only to drop the client.
    """
    loop = clock.loop
    clock.data_seen = True
    clock.client_since = loop.time()
    async with deadline_at(clock.due(), due=clock.due):
        await response.write(first)
        clock.client_since = None
        clock.last_data = loop.time()
        while chunk := await exchange.read():
            if out := scanner.feed(chunk):
                clock.client_since = loop.time()
                await response.write(out)
                clock.client_since = None
            clock.last_data = loop.time()


async def _end_with(
    call: Call, request: web.Request, response: web.StreamResponse, clock: Clock,
    error: GatewayError | None, tail: bytes = b"",
) -> None:
    """Ends a committed stream, with one error event and no end marker when `error` is given
    (`tail`, when the upstream's own error event ends it, else the gateway's); a client that
    takes nothing for `client_stall_s` meanwhile is dropped."""
    clock.client_since = clock.loop.time()
    try:
        async with deadline_at(clock.client_since + clock.client_stall_s):
            if error is not None:
                await response.write(tail or call.api.error_event(error))
            await response.write_eof()
    except TimeoutError:
        _drop_client(call, request, clock)
    except ConnectionResetError:
        call.status = 499  # the client left


def _drop_client(call: Call, request: web.Request, clock: Clock) -> Verdict:
    """Ends the stream of a client that stopped taking bytes: its connection is aborted, what it
    has not taken is discarded, and the upstream, which kept up, is not at fault."""
    waited = clock.loop.time() - (clock.client_since or clock.loop.time())
    log.warning(
        "stream dropped: the client took no bytes for %.1fs (client_stall_s=%g, total_s=%g), "
        "request %s",
        waited, clock.client_stall_s, clock.timeouts.total_s, call.request_id,
    )
    call.status, call.error_type = 408, "client_timeout"
    # A graceful close would wait for the client to take the buffered bytes, which it may never do.
    if request.transport is not None:
        request.transport.abort()
    return SUCCESS
