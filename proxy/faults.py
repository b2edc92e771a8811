"""Classification of one upstream HTTP answer into a fault class (SPEC §4, §5).

Owns which status/body/headers mean caller, account or transient fault, and OpenAI's duration
format. Pure: no I/O, no clock (the caller passes `now`), no aiohttp/redis.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import timezone
from email.utils import parsedate_to_datetime
from typing import Mapping

import orjson

# A 429 that names no wait still needs some: long enough not to hammer, short enough to recover.
DEFAULT_COOLDOWN_S = 1.0
# A bogus header must not bench an account for ever; daily limits reset within a day.
MAX_COOLDOWN_S = 86400.0

_CALLER_STATUSES = frozenset({400, 404, 413, 422})
_QUARANTINE_STATUSES = frozenset({401, 403})
_QUOTA_MARKER = b"insufficient_quota"
# Answers a provider gives for its whole service, whichever account asked (SPEC §5).
_OVERLOADED_STATUS = 529
_OVERLOADED_MARKER = b"overloaded_error"
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|d|h|m|s)"
_DURATION = re.compile(rf"(?:{_DURATION_PART})+")
_DURATION_PARTS = re.compile(_DURATION_PART)
_UNIT_SECONDS = {
    "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9,
}


class Fault(enum.Enum):
    NONE = "none"  # 2xx
    CALLER = "caller"  # relayed, no retry, no penalty
    QUARANTINE = "quarantine"  # bad credentials: out until reload or a successful probe
    DISABLE = "disable"  # out of quota: out until a restart (kept across reloads)
    COOLDOWN = "cooldown"  # rate limited: out until `until`
    TRANSIENT = "transient"  # breaker failure; the request moves on


@dataclass(frozen=True, slots=True)
class Verdict:
    fault: Fault
    until: float | None = None  # COOLDOWN only: when the account may be used again
    reason: str = ""  # short fixed text, safe for logs and /admin/state; never the body
    # TRANSIENT only: a fault of what every account of the provider shares (its host, or the
    # whole service saying it is overloaded), so it counts on the provider's breaker too
    shared: bool = False


@dataclass(frozen=True, slots=True)
class Headroom:
    """An upstream's own x-ratelimit-remaining-* and how long until an exhausted one refills."""

    remaining_requests: int | None
    remaining_tokens: int | None
    reset_s: float  # 0 when neither is exhausted


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    *,
    wall_now: float | None = None,
) -> Verdict:
    """Classify one answer. An HTTP-date Retry-After counts only when `wall_now` (Unix time) is
    given: `now` may be a monotonic clock, and misreading one would bench an account for a day."""
    if 200 <= status < 300:
        return Verdict(Fault.NONE)
    if status == 402 or (status >= 400 and _is_quota_error(body)):
        return Verdict(Fault.DISABLE, reason=f"upstream {status} insufficient_quota")
    reason = f"upstream {status}"
    if status in _CALLER_STATUSES:
        return Verdict(Fault.CALLER, reason=reason)
    if status in _QUARANTINE_STATUSES:
        return Verdict(Fault.QUARANTINE, reason=reason)
    if status == 429:
        wait = cooldown_seconds(headers, wall_now)
        return Verdict(Fault.COOLDOWN, until=now + wait, reason=reason)
    overloaded = status == _OVERLOADED_STATUS or _is_error_type(body, _OVERLOADED_MARKER)
    return Verdict(Fault.TRANSIENT, reason=reason, shared=overloaded)


def cooldown_seconds(headers: Mapping[str, str], wall_now: float | None = None) -> float:
    """How long a 429 asks us to wait: the largest hint present, else DEFAULT_COOLDOWN_S.

    A reset-* hint is skipped when its remaining-* says that dimension still has room: OpenAI's
    reset is the time until the bucket is full again, not why this request was refused.
    """
    hints = [
        _parse_number(headers.get("retry-after-ms"), 1e-3),
        _parse_retry_after(headers.get("retry-after"), wall_now),
    ]
    for dimension in ("requests", "tokens"):
        remaining = _parse_number(headers.get(f"x-ratelimit-remaining-{dimension}"), 1.0)
        if remaining is None or remaining <= 0:
            text = headers.get(f"x-ratelimit-reset-{dimension}")
            hints.append(parse_duration(text) if text is not None else None)
    present = [hint for hint in hints if hint is not None]
    if not present:
        return DEFAULT_COOLDOWN_S
    return min(MAX_COOLDOWN_S, max(present))


def read_headroom(headers: Mapping[str, str]) -> Headroom | None:
    """None when the answer names no remaining-*; an exhausted dimension without a reset-*
    refills after DEFAULT_COOLDOWN_S."""
    requests = _parse_count(headers.get("x-ratelimit-remaining-requests"))
    tokens = _parse_count(headers.get("x-ratelimit-remaining-tokens"))
    if requests is None and tokens is None:
        return None
    reset_s = 0.0
    for remaining, dimension in ((requests, "requests"), (tokens, "tokens")):
        if remaining == 0:
            text = headers.get(f"x-ratelimit-reset-{dimension}")
            wait = parse_duration(text) if text is not None else None
            wait = DEFAULT_COOLDOWN_S if wait is None else min(wait, MAX_COOLDOWN_S)
            reset_s = max(reset_s, wait)
    return Headroom(remaining_requests=requests, remaining_tokens=tokens, reset_s=reset_s)


def parse_duration(text: str) -> float | None:
    """Seconds in OpenAI's reset form ("850ms", "6s", "1m30s", "1h2m3.5s"); a bare number is
    seconds. None for anything else, so a garbage header is simply not a hint."""
    text = text.strip()
    if _DURATION.fullmatch(text):
        parts = _DURATION_PARTS.findall(text)
        return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    return _parse_number(text, 1.0)


def _parse_number(text: str | None, scale: float) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value * scale


def _parse_count(text: str | None) -> int | None:
    value = _parse_number(text, 1.0)
    return None if value is None else int(value)


def _parse_retry_after(text: str | None, wall_now: float | None) -> float | None:
    if text is None:
        return None
    seconds = _parse_number(text, 1.0)
    if seconds is not None or wall_now is None:
        return seconds
    try:
        moment = parsedate_to_datetime(text.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000" parses naive; RFC 9110 dates are GMT anyway.
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, moment.timestamp() - wall_now)


def _is_quota_error(body: bytes) -> bool:
    return _is_error_type(body, _QUOTA_MARKER)


def _is_error_type(body: bytes, marker: bytes) -> bool:
    """Whether the error body's `code` or `type` (in `error` or at the top) is `marker`."""
    # The substring test keeps ordinary error bodies from being parsed at all.
    if marker not in body:
        return False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(document, dict):
        return False
    name = marker.decode()
    error = document.get("error")
    for holder in (error, document) if isinstance(error, dict) else (document,):
        if holder.get("code") == name or holder.get("type") == name:
            return True
    return False
