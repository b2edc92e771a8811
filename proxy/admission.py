"""Admission on the request path: what a request reserves, which buckets it takes from, the answer
to a refusal, and OpenAI's `x-ratelimit-*` headers.

The bucket math and the stores live in `ratelimit`/`redislimits`; this module only speaks for
one request: what it reserved, which budget period it was admitted in, and what it is charged
(tokens and cost) when it settles. The tables it reads are built once per config by
`buckets.BucketTables`.
"""

from __future__ import annotations

import math

from .buckets import NO_BUCKETS
from .call import Call
from .cost import cost_nano
from .errors import GatewayError, budget_exhausted, rate_limited
from .ratelimit import RPM, TPM, Ask, Bucket, Budget, Levels, Refusal
from .usage import Charge

_HEADER_KINDS = {
    dimension: tuple(f"x-ratelimit-{part}-{kind}" for part in ("limit", "remaining", "reset"))
    for dimension, kind in ((RPM, "requests"), (TPM, "tokens"))
}


def reservation(call: Call) -> int:
    """Tokens reserved up front: the prompt at ~4 bytes a token (the body's size, a cheap upper
    estimate) plus n × the completion cap the request names, or the model's default."""
    parsed, model = call.parsed, call.model
    assert parsed is not None and model is not None
    completion = parsed.max_tokens or model.default_max_tokens
    return len(call.body) // 4 + max(1, parsed.n) * completion


async def admit(call: Call) -> None:
    """Takes from the key's and model's buckets, or answers 429/402 having taken nothing."""
    gateway, key, model = call.gateway, call.key, call.model
    assert key is not None and model is not None
    buckets = gateway.buckets.keys[key.name] + gateway.buckets.models[model.name]
    period = gateway.limiter.period_clock.current(key.budget_period)
    budgeted = key.budget_tokens is not None or key.budget_nano_usd is not None
    if not buckets and not budgeted:
        call.period = period
        return
    call.reserved = reservation(call)
    budget = Budget(key.name, period.id, key.budget_tokens, key.budget_nano_usd) if budgeted else None
    ask = Ask(buckets, call.reserved, budget)
    decision = await gateway.limiter.admit(ask)
    call.extra_headers.update(ratelimit_headers(gateway.buckets.keys[key.name], decision.levels))
    if isinstance(decision, Refusal):
        raise refusal_error(call, decision)
    call.grants.append(decision)
    call.period = period  # admitted: charged to this period when it settles


async def admit_account(call: Call, account_id: str) -> bool:
    """Whether the account's own buckets let this request through (taken when they do)."""
    buckets = call.gateway.buckets.accounts.get(account_id, NO_BUCKETS)
    if not buckets:
        return True
    if not call.reserved:
        call.reserved = reservation(call)
    decision = await call.gateway.limiter.admit(Ask(buckets, call.reserved))
    if isinstance(decision, Refusal):
        if call.gateway.metrics is not None:
            call.gateway.metrics.rejections(("account", _dimension(decision))).inc()
        return False
    call.grants.append(decision)
    return True


def refusal_error(call: Call, refusal: Refusal) -> GatewayError:
    bucket = refusal.bucket
    scope, dimension = ("key", "budget") if bucket is None else (bucket.scope, bucket.dimension)
    if call.gateway.metrics is not None:
        call.gateway.metrics.rejections((scope, dimension)).inc()
    if bucket is None:
        return budget_exhausted(refusal.budget, call.key.budget_period if call.key is not None else "total")
    return rate_limited(f"{scope}.{dimension}", refusal.retry_after_s)


def settle_limits(call: Call) -> None:
    """Hands every grant back with the real usage, and charges the request to its key's period
    (tokens and cost); the reservation when an answer came but its usage never did."""
    if not call.grants and call.period is None:
        return
    prompt, completion = charged_tokens(call)
    for grant in call.grants:
        call.gateway.limiter.settle(grant, prompt + completion)
    call.grants.clear()
    if call.period is not None:
        charge(call, prompt, completion)
        call.period = None


def charged_tokens(call: Call) -> tuple[int, int]:
    """(prompt, completion) tokens the request is charged: what the upstream reported; when it
    reported nothing (a client gone mid-stream or mid-attempt, a cut stream) the reservation,
    split into its prompt estimate and completion cap; 0 when no upstream answered or every
    attempt failed (a failed attempt's usage is never the client's)."""
    if call.prompt_tokens is not None or call.completion_tokens is not None:
        return call.prompt_tokens or 0, call.completion_tokens or 0
    # cancelled (the client left, or shutdown) while an upstream was working on it
    abandoned = call.status == 499 and call.attempts > 0
    if call.first_byte_at is None and not abandoned:
        return 0, 0
    reserved = call.reserved or reservation(call)
    prompt = min(reserved, len(call.body) // 4)
    return prompt, reserved - prompt


def charge(call: Call, prompt: int, completion: int) -> None:
    """Records the request's usage and cost (at the price of the model that served it)."""
    key, model, period = call.key, call.model, call.period
    assert key is not None and model is not None and period is not None
    price = (call.served_model or model).price
    cached = written = 0
    if call.prompt_tokens is not None and (call.cached_tokens or call.cache_write_tokens):
        cached = min(call.cached_tokens, prompt)
        written = min(call.cache_write_tokens, prompt - cached)
    if price is not None:
        call.cost_nano = cost_nano(price, prompt=prompt, cached=cached, cache_write=written, completion=completion)
    call.gateway.limiter.record(
        Charge(key.name, period, model.name, prompt, cached, written, completion, prompt + completion, call.cost_nano)
    )
    metrics = call.gateway.metrics
    if metrics is not None and call.cost_nano:
        metrics.cost((model.name, key.name)).inc(call.cost_nano / 1e9)


def ratelimit_headers(key_buckets: tuple[Bucket, ...], levels: Levels) -> dict[str, str]:
    headers: dict[str, str] = {}
    for bucket in key_buckets:
        kind = _HEADER_KINDS.get(bucket.dimension)
        level = levels.get(bucket.id)
        if kind is None or level is None:
            continue
        remaining, reset_s = level
        headers[kind[0]] = str(bucket.limit)
        headers[kind[1]] = str(max(0, math.floor(remaining)))
        headers[kind[2]] = openai_duration(reset_s)
    return headers


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: `850ms`, `6s`, `1m30s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _dimension(refusal: Refusal) -> str:
    return refusal.bucket.dimension if refusal.bucket is not None else "budget"

