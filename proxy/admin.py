"""The admin routes' key check, and `GET /admin/usage` (SPEC §12): usage and cost per key and
model for the current or previous budget period, with each key's budgets and what is left.

Reads what the limiter counted (Redis: the same on every replica; else this process) and the
config; renders it. Decides nothing about admission.
"""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from aiohttp import web

from . import errors
from .call import Call
from .config import KeyConfig
from .cost import NANO_PER_USD, usd
from .errors import GatewayError
from .periods import Period, iso, period_at, previous_period
from .pipeline import bearer_token, render_error, request_id_of, utf8_or_empty
from .state import STATE
from .usage import ROW_FIELDS, PeriodUsage

_ROW_NAMES = (
    "requests", "prompt_tokens", "cached_tokens", "cache_write_tokens", "completion_tokens",
    "cost_usd", "unpriced_requests",
)
_COST = ROW_FIELDS.index("c")


def authorize_admin(request: web.Request) -> None:
    """Refuses a request without the admin key (or every request when none is configured)."""
    admin_key = request.app[STATE].server.admin_key
    if not admin_key:
        raise errors.admin_disabled()
    presented = utf8_or_empty(bearer_token(request))
    if not hmac.compare_digest(presented.encode(), admin_key.encode()):
        raise errors.invalid_api_key()


async def handle_usage(request: web.Request) -> web.Response:
    gateway = request.app[STATE].gateway
    call = Call(gateway=gateway, request_id=request_id_of(request), started=0.0)
    try:
        authorize_admin(request)
        which = request.query.get("period", "current")
        if which not in ("current", "previous"):
            raise errors.invalid_value("period", "period must be current or previous.")
        now = gateway.limiter.period_clock.now()
        chosen = [
            (key, period_at(key.budget_period, now) if which == "current" else previous_period(key.budget_period, now))
            for key in gateway.config.keys
        ]
        found = await gateway.limiter.usage([(k.name, p.id) for k, p in chosen if p is not None])
    except GatewayError as exc:
        return render_error(call, exc)
    keys = [key_report(key, period, found.get((key.name, period.id)) if period else None) for key, period in chosen]
    body = orjson.dumps({"period": which, "keys": keys})
    return web.Response(body=body, content_type="application/json", headers={"x-request-id": call.request_id})


def key_report(key: KeyConfig, period: Period | None, usage: PeriodUsage | None) -> dict[str, Any]:
    """One key's usage in `period` (None: `total` has no previous period)."""
    usage = usage or PeriodUsage()
    models = {name: _row(row) for name, row in sorted(usage.models.items())}
    totals = [sum(row[i] for row in usage.models.values()) for i in range(len(ROW_FIELDS))]
    report = {"key": key.name, "budget_period": key.budget_period, "period": _period(period), **_row(totals)}
    report["budget_tokens"] = _budget(key.budget_tokens, usage.tokens)
    budget_nano = _budget(key.budget_nano_usd, usage.cost_nano)
    report["budget_usd"] = (
        None if budget_nano is None else {name: value / NANO_PER_USD for name, value in budget_nano.items()}
    )
    report["models"] = models
    return report


def _row(row: list[int]) -> dict[str, Any]:
    figures: dict[str, Any] = dict(zip(_ROW_NAMES, row))
    figures["cost_usd"] = usd(row[_COST])
    return figures


def _period(period: Period | None) -> dict[str, Any] | None:
    if period is None:
        return None
    return {"id": period.id, "start": iso(period.start), "end": iso(period.end)}


def _budget(limit: int | None, used: int) -> dict[str, int] | None:
    if limit is None:
        return None
    return {"limit": limit, "used": used, "left": max(0, limit - used)}
