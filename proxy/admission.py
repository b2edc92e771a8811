"""Admission on the request path: what a request reserves, which buckets it takes from, the answer
to a refusal, and OpenAI's `x-ratelimit-*` headers.

The bucket math and the stores live in `ratelimit`/`redislimits`; this module only speaks for
one request. The tables it reads are built once per config by `buckets.BucketTables`.
"""

from __future__ import annotations

import math

from .buckets import NO_BUCKETS
from .call import Call
from .errors import GatewayError, budget_exhausted, rate_limited
from .ratelimit import RPM, TPM, Ask, Bucket, Levels, Refusal

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
    if not buckets and key.budget_tokens is None:
        return
    call.reserved = reservation(call)
    ask = Ask(buckets, call.reserved, key.name, key.budget_tokens)
    decision = await gateway.limiter.admit(ask)
    call.extra_headers.update(ratelimit_headers(gateway.buckets.keys[key.name], decision.levels))
    if isinstance(decision, Refusal):
        raise refusal_error(call, decision)
    call.grants.append(decision)


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
        return budget_exhausted()
    return rate_limited(f"{scope}.{dimension}", refusal.retry_after_s)


def settle_limits(call: Call) -> None:
    """Hands every grant back with the real usage; the reservation when usage never came."""
    if not call.grants:
        return
    if call.prompt_tokens is not None or call.completion_tokens is not None:
        used = (call.prompt_tokens or 0) + (call.completion_tokens or 0)
    else:
        # answered but unreported (client gone mid-stream): charge the estimate; never reached: 0
        used = call.reserved if call.first_byte_at is not None else 0
    for grant in call.grants:
        call.gateway.limiter.settle(grant, used)
    call.grants.clear()


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

