"""`POST /v1/messages/count_tokens` after authorization: counted, never admitted or charged.

Goes to an Anthropic account of the model when it has one (the provider's `native_messages()`
can count), its answer relayed as it came; otherwise, or when that attempt fails, answers the
estimate of `messages_request.estimate_tokens` (never 0 for a non-empty request: Claude Code
trusts a 0 and then never compacts its context, reference §7.7).
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from aiohttp import web

from .account import Account
from .call import Call
from .clock import Clock
from .faults import Fault, Verdict
from .forward import MAX_ERROR_BODY, SUCCESS, TRANSIENT, read_all
from .httpmessage import UpstreamFailure
from .messages_request import estimate_tokens
from .upstream import Exchange

log = logging.getLogger("llm_proxy.count_tokens")

async def count_tokens(call: Call, request: web.Request) -> web.Response:
    counted = await _upstream_count(call)
    if counted is not None:
        return counted
    assert call.messages is not None
    body = orjson.dumps({"input_tokens": estimate_tokens(call.messages.data)})
    return web.Response(body=body, headers=call.response_headers({"Content-Type": "application/json"}))


async def _upstream_count(call: Call) -> web.Response | None:
    """The answer of an account that can count, or None when none could."""
    gateway, model, key = call.gateway, call.model, call.key
    assert model is not None and key is not None
    loop = asyncio.get_running_loop()
    skipped: list[Account] = []
    while True:
        choice = gateway.accounts.choose(model=model, group=key.group, tried=skipped, session=call.session, now=loop.time())
        if choice.account is None or choice.target is None:
            return None
        native = gateway.providers[choice.target.provider].native_messages()
        if native is None:
            skipped.append(choice.account)  # an OpenAI-format account: another may count
            continue
        prepared = native.prepare(call, choice.target.model)
        attempt = gateway.accounts.begin(choice, loop.time())
        call.provider, call.account = choice.account.provider.name, choice.account.config.name
        call.provider_type, call.attempts = native.config.type, call.attempts + 1
        verdict: Verdict | None = None
        exchange: Exchange | None = None
        clock = Clock(native.config.timeouts)
        started = time.perf_counter()
        try:
            async with clock.timer:
                exchange = await native.count_tokens(choice.account.config, prepared, call.request_id)
                body = await read_all(exchange, clock, MAX_ERROR_BODY)
            if not exchange.finished:
                raise UpstreamFailure("bad_response", "a count_tokens answer over 1 MiB")
            if 200 <= exchange.status < 300:
                verdict = SUCCESS
            else:
                verdict = native.classify(exchange.status, exchange.headers, body, loop.time(), wall_now=time.time())
            if verdict.fault in (Fault.NONE, Fault.CALLER):
                relayed, headers = native.relay(exchange.status, exchange.headers, body)
                return web.Response(status=exchange.status, body=relayed, headers=call.response_headers(headers))
            log.warning("count_tokens upstream %s/%s answered %d: estimated", call.provider, call.account, exchange.status)
            return None
        except (TimeoutError, UpstreamFailure) as exc:
            verdict = TRANSIENT
            log.warning("count_tokens upstream %s/%s failed (%s): estimated", call.provider, call.account, type(exc).__name__)
            return None
        finally:
            call.upstream_s += time.perf_counter() - started
            if exchange is not None:
                exchange.close()
            gateway.accounts.finish(
                attempt, verdict or SUCCESS, loop.time(), cancelled=verdict is None,
                headers=exchange.headers if exchange is not None else None,
            )

