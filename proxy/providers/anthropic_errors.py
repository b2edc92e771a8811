"""Anthropic error answers → fault classes (reference §4, SPEC §9), and the OpenAI-shaped body
of a relayed caller fault (reference §0.6).

Owns which Anthropic status, error type and headers mean a caller, account or transient fault,
and when a rate-limited account may serve again. Pure: no I/O, no clock (the caller passes `now`).
Verdict reasons are short fixed texts, never the upstream's body.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Mapping

import orjson

from ..errors import GatewayError
from ..faults import DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S, Fault, Verdict, cooldown_seconds

# The status each Anthropic error type stands for (an in-band stream error has only its type).
ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
    403: "permission_error", 404: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error",
}
_DIMENSIONS = ("requests", "tokens", "input-tokens", "output-tokens")
_HINTS = ("retry-after", "retry-after-ms", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_SPEND_CODE = "enforced_spend_limit_reached"
# The wording of the 400 for a spend limit the organisation set is unverified (reference §10.4).
_SPEND_LIMIT = re.compile(r"spend(?:ing)? limit", re.IGNORECASE)
MAX_ERROR_PARSE = 1 << 20


def classify_anthropic(
    status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float | None
) -> Verdict:
    """One Anthropic answer's fault class. `now` is the clock cooldowns run on; RFC 3339 resets
    and HTTP-date retry-after count only with `wall_now` (Unix time)."""
    if 200 <= status < 300:
        return Verdict(Fault.NONE)
    error = _error(body)
    kind = error.get("type") if error is not None else None
    if status == 402 or kind == "billing_error":
        return Verdict(Fault.DISABLE, reason="anthropic billing_error")
    if status == 400 and _spend_limited(error):
        return Verdict(Fault.DISABLE, reason="anthropic 400 spend limit")
    if status in (400, 413):
        return Verdict(Fault.CALLER, reason=f"anthropic {status}")
    if status == 401:
        return Verdict(Fault.QUARANTINE, reason="anthropic 401")
    if status == 403:  # one not from the API (a WAF, a proxy) says nothing of the key
        if error is None:
            return Verdict(Fault.TRANSIENT, reason="anthropic 403 not from the API")
        return Verdict(Fault.QUARANTINE, reason="anthropic 403")
    if status == 404:
        # the gateway chose the path and the model id: the model map is wrong, not the request
        return Verdict(Fault.TRANSIENT, reason="anthropic 404 model not served")
    if status == 429:
        return _rate_limited(headers, error, now, wall_now)
    overloaded = status == 529 or kind == "overloaded_error"
    return Verdict(Fault.TRANSIENT, reason=f"anthropic {status}", shared=overloaded)


def classify_in_band(status: int, body: bytes, now: float) -> Verdict:
    """An `event: error` inside a 200 stream, as the answer of `status` its type stands for. It has
    no headers, so a rate_limit_error cools for the default wait rather than reading as a spend cap."""
    if status == 429 and _spend_code(_error(body)) is None:
        return Verdict(Fault.COOLDOWN, until=now + DEFAULT_COOLDOWN_S, reason="anthropic 429 in stream")
    return classify_anthropic(status, {}, body, now, wall_now=None)


def _rate_limited(
    headers: Mapping[str, str], error: dict[str, Any] | None, now: float, wall_now: float | None
) -> Verdict:
    """Cooling until retry-after, else the reset of an exhausted dimension; neither (a spend
    cap) benches the account until a probe succeeds."""
    if _spend_code(error) is None:
        if any(name in headers for name in _HINTS):
            wait: float | None = cooldown_seconds(headers, wall_now)
        else:
            wait = _exhausted_reset(headers, wall_now)
        if wait is not None:
            return Verdict(Fault.COOLDOWN, until=now + wait, reason="anthropic 429")
    return Verdict(Fault.QUARANTINE, reason="anthropic 429 spend cap")


def _exhausted_reset(headers: Mapping[str, str], wall_now: float | None) -> float | None:
    """Seconds until the latest reset among dimensions whose remaining is 0; None when none is."""
    latest: float | None = None
    for dimension in _DIMENSIONS:
        remaining = headers.get(f"anthropic-ratelimit-{dimension}-remaining")
        if remaining is None or remaining.strip() != "0":
            continue
        reset = headers.get(f"anthropic-ratelimit-{dimension}-reset")
        wait = _until(reset, wall_now) if reset is not None and wall_now is not None else None
        wait = DEFAULT_COOLDOWN_S if wait is None else wait
        latest = wait if latest is None else max(latest, wait)
    return latest


def _until(text: str, wall_now: float) -> float | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return min(MAX_COOLDOWN_S, max(0.0, moment.timestamp() - wall_now))


def _document(body: bytes) -> dict[str, Any] | None:
    if not body.lstrip()[:1] == b"{" or len(body) > MAX_ERROR_PARSE:
        return None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return document if type(document) is dict else None


def _error(body: bytes) -> dict[str, Any] | None:
    """The `error` object of an Anthropic error body; None for anything else (an HTML page, ...)."""
    document = _document(body)
    error = document.get("error") if document is not None else None
    return error if type(error) is dict else None


def _spend_code(error: dict[str, Any] | None) -> str | None:
    details = error.get("details") if error is not None else None
    code = details.get("error_code") if type(details) is dict else None
    return code if code == _SPEND_CODE else None


def _spend_limited(error: dict[str, Any] | None) -> bool:
    if error is None:
        return False
    message = error.get("message")
    return _spend_code(error) is not None or (type(message) is str and _SPEND_LIMIT.search(message) is not None)


def caller_error(status: int, body: bytes) -> bytes:
    """The OpenAI error body for a relayed caller fault: the upstream's message verbatim, OpenAI's
    type for the status, the upstream's error type as `code`. Survives a body that is not JSON."""
    error = _error(body)
    message = error.get("message") if error is not None else None
    if type(message) is not str:
        message = f"The upstream provider refused the request (status {status})."
    kind = error.get("type") if error is not None else None
    if type(kind) is not str:
        kind = "request_too_large" if status == 413 else "invalid_request_error"
    return GatewayError(status, _OPENAI_TYPES.get(status, "invalid_request_error"), kind, message).body()


def upstream_request_id(headers: Mapping[str, str], body: bytes = b"") -> str | None:
    """Anthropic's `request-id` (header, else the error body's), for `x-upstream-request-id`;
    None unless it is a short printable ASCII value, safe as a header."""
    value: Any = headers.get("request-id")
    if value is None:
        document = _document(body)
        value = document.get("request_id") if document is not None else None
    if type(value) is not str or not 0 < len(value) <= 200 or not (value.isascii() and value.isprintable()):
        return None
    return value
