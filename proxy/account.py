"""`Account`: the runtime state of one upstream account, and how a settled attempt changes it.

Owns one account's health (cooldown, quarantine, disabled), in-flight count, upstream headroom and
its JSON row. Pure: takes `now`; must not do I/O or import aiohttp/redis. Choosing among accounts
and recording on breakers is `proxy.accounts`' business.
"""

from __future__ import annotations

from .breaker import Breaker
from .config import AccountConfig, ProviderConfig
from .faults import DEFAULT_COOLDOWN_S, Fault, Headroom, Verdict


class Account:
    """Mutable runtime state of one upstream account; the same object survives config reloads."""

    __slots__ = (
        "provider", "config", "id", "breaker", "provider_breaker", "inflight", "cooldown_until",
        "quarantined", "disabled", "last_error", "remaining_requests", "remaining_tokens",
        "headroom_until", "rr_credit",
    )

    def __init__(
        self, *, provider: ProviderConfig, config: AccountConfig, breaker: Breaker,
        provider_breaker: Breaker,
    ) -> None:
        self.provider = provider
        self.config = config
        self.id = f"{provider.name}/{config.name}"
        self.breaker = breaker
        self.provider_breaker = provider_breaker
        self.inflight = 0
        self.cooldown_until = 0.0
        self.quarantined: str | None = None
        self.disabled: str | None = None
        self.last_error: str | None = None
        self.remaining_requests: int | None = None
        self.remaining_tokens: int | None = None
        self.headroom_until = 0.0
        self.rr_credit = 0.0  # smooth weighted round robin state

    def __repr__(self) -> str:
        return f"Account({self.id!r})"

    def healthy(self, now: float) -> bool:
        """Usable but for the breakers: not benched by an account fault, under its in-flight cap."""
        cap = self.config.max_concurrency
        return (
            self.quarantined is None and self.disabled is None and self.cooldown_until <= now
            and (cap is None or self.inflight < cap)
        )

    def available(self, now: float) -> bool:
        """Could serve a request right now (any group, any model)."""
        return (
            self.healthy(now) and self.breaker.can_pass(now) and self.provider_breaker.can_pass(now)
        )

    def has_headroom(self, now: float) -> bool:
        exhausted = self.remaining_requests == 0 or self.remaining_tokens == 0
        return not exhausted or self.headroom_until <= now

    def apply_fault(self, verdict: Verdict, now: float) -> None:
        fault = verdict.fault
        if fault is Fault.NONE or fault is Fault.CALLER:
            return
        reason = verdict.reason or fault.value
        self.last_error = reason
        if fault is Fault.QUARANTINE:
            self.quarantined = reason
        elif fault is Fault.DISABLE:
            self.disabled = reason
        elif fault is Fault.COOLDOWN:
            until = verdict.until if verdict.until is not None else now + DEFAULT_COOLDOWN_S
            self.cooldown_until = max(self.cooldown_until, until)

    def record_headroom(self, headroom: Headroom, now: float) -> None:
        self.remaining_requests = headroom.remaining_requests
        self.remaining_tokens = headroom.remaining_tokens
        self.headroom_until = now + headroom.reset_s if headroom.reset_s > 0 else 0.0

    def snapshot(self, now: float) -> dict[str, object]:
        """JSON-ready; times are seconds from `now` (None when not pending)."""
        return {
            "provider": self.provider.name,
            "account": self.config.name,
            "breaker": self.breaker.state(now).name.lower(),
            "retry_at": _seconds_until(self.breaker.retry_at(now), now),
            "provider_breaker": self.provider_breaker.state(now).name.lower(),
            "provider_retry_at": _seconds_until(self.provider_breaker.retry_at(now), now),
            "cooldown_until": _seconds_until(self.cooldown_until, now),
            "quarantined": self.quarantined,
            "disabled": self.disabled,
            "inflight": self.inflight,
            "max_concurrency": self.config.max_concurrency,
            "last_error": self.last_error,
            "remaining_requests": self.remaining_requests,
            "remaining_tokens": self.remaining_tokens,
            "available": self.available(now),
        }


def _seconds_until(moment: float | None, now: float) -> float | None:
    return moment - now if moment is not None and moment > now else None
