"""The aiohttp application: routes, the `ServerState` app key, start-up and shutdown.

The edge of the gateway: it maps URLs to handlers and owns the lifetime of what they share.
The request path itself (chat completions, messages, count_tokens) lives in `pipeline`.
"""

from __future__ import annotations

import asyncio
import time
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from functools import partial

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from . import edge, errors
from .accesslog import AccessLog
from .admin import authorize_admin, handle_usage
from .config import Config, ModelConfig
from .edge import EDGE, Edge
from .errors import GatewayError
from .gateway import Gateway
from .metrics import Metrics
from .periods import PeriodClock
from .ratelimit import Limiter, LocalLimiter
from .redislimits import RedisLimiter
from .call import Call
from .chat_api import CHAT
from .messages_api import MESSAGES
from .pipeline import authenticate, handle_chat, handle_count_tokens, handle_messages, render_error, request_id_of
from .state import STATE, ServerState

log = logging.getLogger("llm_proxy.app")

# Every API route is served under each of these prefixes (SPEC §3).
API_PREFIXES = ("", "/api", "/api/client")
STARTED = int(time.time())
STARTED_AT = datetime.fromtimestamp(STARTED, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_app(
    config: Config,
    *,
    access_log: AccessLog | None = None,
    registry: CollectorRegistry | None = None,
    probe_interval_s: float = 30.0,
    workers: int = 1,
    period_clock: PeriodClock | None = None,
) -> web.Application:
    """The gateway as an aiohttp app; ready once its start-up has run. `period_clock` says
    when now is for budget periods (tests shift it across a boundary)."""
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        # every connection's settings, whichever runner serves the app (the tests' is aiohttp's)
        handler_args={"keepalive_timeout": config.server.keepalive_s, "logger": edge.log},
    )
    metrics = Metrics(registry or CollectorRegistry()) if config.logging.metrics else None
    app[EDGE] = Edge.for_server(config.server, metrics.registry if metrics is not None else None)
    app.cleanup_ctx.append(
        partial(
            _lifetime,
            config=config,
            access_log=access_log,
            metrics=metrics,
            probe_interval_s=probe_interval_s,
            workers=workers,
            period_clock=period_clock or PeriodClock(),
        )
    )
    _add_routes(app.router)
    return app


def _add_routes(router: web.UrlDispatcher) -> None:
    for prefix in API_PREFIXES:
        router.add_post(f"{prefix}/v1/chat/completions", handle_chat)
        router.add_post(f"{prefix}/v1/messages", handle_messages)
        router.add_post(f"{prefix}/v1/messages/count_tokens", handle_count_tokens)
        router.add_get(f"{prefix}/v1/models", _models)
        router.add_get(f"{prefix}/v1/models/{{model:.+}}", _model)
    router.add_get("/healthz", _healthz)
    router.add_get("/readyz", _readyz)
    router.add_get("/admin/state", _admin_state)
    router.add_get("/admin/usage", handle_usage)
    router.add_get("/metrics", _metrics)
    # Last: only what no route above serves reaches it, so matched requests pay nothing for it.
    router.add_route("*", "/{path:.*}", _unmatched)


async def _lifetime(
    app: web.Application,
    *,
    config: Config,
    access_log: AccessLog | None,
    metrics: Metrics | None,
    probe_interval_s: float,
    workers: int,
    period_clock: PeriodClock,
) -> AsyncIterator[None]:
    limiter: Limiter
    if config.redis.url:
        limiter, divisor = RedisLimiter(config=config.redis, period_clock=period_clock), 1
    else:
        # each worker holds its own in-process buckets: a share of every limit
        limiter, divisor = LocalLimiter(period_clock=period_clock), workers
    await limiter.start()
    gateway = Gateway(config=config, limiter=limiter, divisor=divisor, metrics=metrics)
    state = ServerState(server=config.server, gateway=gateway, access_log=access_log)
    app[STATE] = state
    chores = [
        asyncio.create_task(_every(probe_interval_s, lambda: state.gateway.probe_quarantined())),
        asyncio.create_task(_every(1.0, lambda: _refresh_metrics(state))),
    ]
    state.ready = True
    yield
    state.ready = False
    for chore in chores:
        chore.cancel()
    await asyncio.gather(*chores, return_exceptions=True)
    await limiter.close()
    await state.gateway.close()
    if access_log is not None:
        access_log.flush()


async def _every(interval_s: float, chore: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await chore()
        except Exception:
            log.exception("background chore failed; it runs again in %gs", interval_s)


async def _refresh_metrics(state: ServerState) -> None:
    """Keeps state gauges fresh in every worker, since a scrape reaches only one of them."""
    state.gateway.refresh_metrics(asyncio.get_running_loop().time())


async def _models(request: web.Request) -> web.Response:
    """The models the key may use, in Anthropic's list shape for Anthropic clients (SPEC §10)."""
    call = _models_call(request)
    try:
        authenticate(call, request)
    except GatewayError as exc:
        return render_error(call, exc)
    assert call.key is not None
    models = call.gateway.models_for(call.key)
    if call.api is MESSAGES:
        data = [_anthropic_model(model) for model in models]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return _json(request, {"data": data, "has_more": False, "first_id": first, "last_id": last})
    return _json(request, {"object": "list", "data": [_model_object(model) for model in models]})


async def _model(request: web.Request) -> web.Response:
    """One model the key may use; any other name is not found, so keys learn no other names."""
    call = _models_call(request)
    name = request.match_info["model"]
    try:
        authenticate(call, request)
        assert call.key is not None
        model = call.gateway.models.get(name)
        if model is None or (call.key.models is not None and name not in call.key.models):
            raise errors.model_not_found(name)
    except GatewayError as exc:
        return render_error(call, exc)
    return _json(request, _anthropic_model(model) if call.api is MESSAGES else _model_object(model))


def _models_call(request: web.Request) -> Call:
    """Anthropic's SDKs (and Claude Code) always send `anthropic-version`; OpenAI's never do."""
    api = MESSAGES if "anthropic-version" in request.headers else CHAT
    return Call(gateway=request.app[STATE].gateway, request_id=request_id_of(request), started=0.0, api=api)


def _model_object(model: ModelConfig) -> dict[str, object]:
    return {
        "id": model.name,
        "object": "model",
        "created": STARTED,
        "owned_by": model.targets[0].provider if model.targets else "llm-proxy",
    }


def _anthropic_model(model: ModelConfig) -> dict[str, object]:
    return {"type": "model", "id": model.name, "display_name": model.name, "created_at": STARTED_AT}


async def _unmatched(request: web.Request) -> web.Response:
    """404 `unknown_route`, or 405 `method_not_allowed` with `Allow` when the path has routes."""
    catch_all = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not catch_all:
            allowed |= (await resource.resolve(request))[1]
    call = Call(gateway=request.app[STATE].gateway, request_id=request_id_of(request), started=0.0)
    if not allowed:
        return render_error(call, errors.unknown_route(request.method, request.path))
    response = render_error(call, errors.method_not_allowed(request.method, request.path))
    response.headers["Allow"] = ", ".join(sorted(allowed))
    return response


async def _metrics(request: web.Request) -> web.Response:
    gateway = request.app[STATE].gateway
    request_id = request_id_of(request)
    if gateway.metrics is None:
        call = Call(gateway=gateway, request_id=request_id, started=0.0)
        return render_error(call, errors.unknown_route(request.method, "/metrics (logging.metrics: false)"))
    gateway.refresh_metrics(asyncio.get_running_loop().time())
    headers = {"Content-Type": CONTENT_TYPE_LATEST, "x-request-id": request_id}
    return web.Response(body=gateway.metrics.exposition(), headers=headers)


async def _healthz(request: web.Request) -> web.Response:
    return _json(request, {"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app.get(STATE)
    if state is None or not state.ready:
        return _json(request, {"status": "not ready"}, status=503)
    return _json(request, {"status": "ready"})


async def _admin_state(request: web.Request) -> web.Response:
    state = request.app[STATE]
    call = Call(gateway=state.gateway, request_id=request_id_of(request), started=0.0)
    try:
        authorize_admin(request)
    except GatewayError as exc:
        return render_error(call, exc)
    now = asyncio.get_running_loop().time()
    return _json(request, {"accounts": state.gateway.accounts.snapshot(now)})


def _json(request: web.Request, data: object, *, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(data),
        status=status,
        content_type="application/json",
        headers={"x-request-id": request_id_of(request)},
    )
