"""Rate limits and budgets (SPEC §6): bucket math, request and decision types, in-process store.

Owns the token-bucket arithmetic as pure functions of `now` (the Redis script mirrors them line by
line), the `Limiter` interface the pipeline admits through, and `LocalLimiter`, the store used
without Redis. Must not import aiohttp or redis, nor know how a refusal is rendered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .config import Limits
from .periods import PeriodClock
from .usage import Charge, PeriodUsage, UsageLedger

RPM = "rpm"
TPM = "tpm"
CONCURRENCY = "concurrency"
# A bucket refills its whole `limit` over this many seconds.
WINDOW_S = 60.0
# A concurrency slot frees when some request ends, which cannot be predicted; clients are told to
# come back after this long.
CONCURRENCY_RETRY_S = 1.0
# No request uses anywhere near this many tokens. Usage is settled as at most this much, so that
# no figure, however absurd, can overflow a counter or the shared store's script payload.
MAX_TOKENS = 1 << 40

Levels = dict[str, tuple[float, float]]


@dataclass(frozen=True, slots=True)
class Bucket:
    """One limit: `limit` per minute (rpm, tpm) or `limit` at once (concurrency)."""

    scope: str  # "key" | "account" | "model"
    name: str  # key name / "provider/account" / model name
    dimension: str  # "rpm" | "tpm" | "concurrency"
    limit: int
    id: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"{self.scope}:{self.name}:{self.dimension}")


def buckets_for(scope: str, name: str, limits: Limits, divisor: int = 1) -> tuple[Bucket, ...]:
    """The buckets `limits` sets, each limit ÷ `divisor` (at least 1). Built once per config."""
    divisor = max(1, divisor)
    found = ((RPM, limits.rpm), (TPM, limits.tpm), (CONCURRENCY, limits.concurrency))
    return tuple(
        Bucket(scope, name, dimension, max(1, limit // divisor))
        for dimension, limit in found
        if limit is not None
    )


def refill(level: float, updated: float, limit: int, now: float) -> float:
    """The level at `now` of a bucket that held `level` at `updated`; never above `limit`."""
    elapsed = now - updated
    if elapsed <= 0:
        return level
    return min(float(limit), level + elapsed * limit / WINDOW_S)


def wait_s(level: float, amount: float, limit: int) -> float:
    """Seconds until a bucket at `level` holds `amount`; 0 when it already does."""
    if level >= amount:
        return 0.0
    return (amount - level) * WINDOW_S / limit


def until_full_s(level: float, limit: int) -> float:
    """Seconds until a bucket at `level` is full again (OpenAI's `x-ratelimit-reset-*`)."""
    return wait_s(level, limit, limit)


def settle_level(level: float, limit: int, reserved: int, used: int) -> float:
    """The level once a reservation of `reserved` turned out to be `used`: refund or debt."""
    return min(float(limit), level + reserved - used)


def settled_tokens(used: int) -> int:
    """What a settlement counts of `used`: within 0..MAX_TOKENS."""
    return min(max(0, used), MAX_TOKENS)


def amount_for(bucket: Bucket, tokens: int) -> int:
    """What one request takes from `bucket`: 1, or its token reservation capped at the size."""
    if bucket.dimension == TPM:
        return min(max(1, tokens), bucket.limit)
    return 1


@dataclass(frozen=True, slots=True)
class Budget:
    """A key's budgets for one period: checked at admission against what that period recorded."""

    key: str  # key name
    period: str  # period id (`periods.Period.id`)
    tokens: int | None = None  # budget_tokens
    nano_usd: int | None = None  # budget_usd in nano-dollars

    def spent(self, tokens: int, nano_usd: int) -> str:
        """Which budget the recorded usage has reached: "tokens", "usd", or "" (neither)."""
        if self.tokens is not None and tokens >= self.tokens:
            return "tokens"
        if self.nano_usd is not None and nano_usd >= self.nano_usd:
            return "usd"
        return ""


@dataclass(slots=True)
class Ask:
    """One admission: every bucket the request takes from, and the budget it is checked against."""

    buckets: Sequence[Bucket]
    tokens: int  # reservation for tpm buckets (each capped at that bucket's limit)
    budget: Budget | None = None


class Grant:
    """An admitted request's holdings, handed back to `Limiter.settle` (once; again is a no-op)."""

    __slots__ = ("id", "levels", "leases", "reserved", "remote", "settled")

    def __init__(
        self,
        *,
        id: str,
        levels: Levels,
        leases: tuple[Bucket, ...],
        reserved: tuple[tuple[Bucket, int], ...],
        remote: bool = False,
    ) -> None:
        self.id = id
        self.levels = levels  # bucket id -> (remaining after the take, seconds until full)
        self.leases = leases  # concurrency buckets holding a lease
        self.reserved = reserved  # tpm buckets and the tokens taken from each
        self.remote = remote  # issued by the shared store, not a process-local one
        self.settled = False


@dataclass(slots=True)
class Refusal:
    """A refused admission; nothing was taken from any bucket."""

    bucket: Bucket | None  # None when the budget refused (→ 402)
    retry_after_s: float
    levels: Levels
    budget: str = ""  # which budget refused: "tokens" | "usd"


class Limiter(Protocol):
    period_clock: PeriodClock  # "now" for budget periods

    @property
    def degraded(self) -> bool: ...

    async def admit(self, ask: Ask) -> Grant | Refusal: ...

    def settle(self, grant: Grant, used_tokens: int) -> None: ...

    def record(self, charge: Charge) -> None:
        """Counts a settled request against its key's period (budgets and the usage report)."""

    async def usage(self, wanted: Sequence[tuple[str, str]]) -> Mapping[tuple[str, str], PeriodUsage]:
        """The usage recorded for each (key name, period id) in `wanted`."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalLimiter:
    """The in-process store: the same semantics as the shared one, for one replica (or fallback)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, period_clock: PeriodClock | None = None
    ) -> None:
        self._clock = clock
        self.period_clock = period_clock or PeriodClock()
        self._rates: dict[str, list[float]] = {}  # bucket id -> [level, updated]
        self._held: dict[str, int] = {}  # bucket id -> leases in flight
        self.ledger = UsageLedger()

    @property
    def degraded(self) -> bool:
        return False

    async def admit(self, ask: Ask) -> Grant | Refusal:
        return self.admit_now(ask)

    def admit_now(self, ask: Ask) -> Grant | Refusal:
        """`admit` without the coroutine: takes from every bucket, or from none."""
        now = self._clock()
        levels: Levels = {}
        refusing: Bucket | None = None
        longest = 0.0
        for bucket in ask.buckets:
            wait, level = self._check(bucket, ask.tokens, now)
            full = 0.0 if bucket.dimension == CONCURRENCY else until_full_s(level, bucket.limit)
            levels[bucket.id] = (level, full)
            if wait > longest:
                refusing, longest = bucket, wait
        budget = ask.budget
        if budget is not None and (spent := budget.spent(*self.ledger.spent(budget.key, budget.period))):
            return Refusal(None, 0.0, levels, spent)
        if refusing is not None:
            return Refusal(refusing, longest, levels)
        return self._take(ask, levels, now)

    def settle(self, grant: Grant, used_tokens: int) -> None:
        if grant.settled:
            return
        grant.settled = True
        used = settled_tokens(used_tokens)
        for bucket in grant.leases:
            self._held[bucket.id] -= 1
        now = self._clock()
        for bucket, reserved in grant.reserved:
            state = self._rates[bucket.id]
            level = refill(state[0], state[1], bucket.limit, now)
            state[0], state[1] = settle_level(level, bucket.limit, reserved, used), now

    def record(self, charge: Charge) -> None:
        self.ledger.add(charge)

    async def usage(self, wanted: Sequence[tuple[str, str]]) -> Mapping[tuple[str, str], PeriodUsage]:
        return {where: self.ledger.periods.get(where) or PeriodUsage() for where in wanted}

    async def start(self) -> None:
        return None

    async def flush(self) -> None:
        """Nothing is ever pending in process; here so tests drive both stores alike."""
        return None

    async def close(self) -> None:
        return None

    def _check(self, bucket: Bucket, tokens: int, now: float) -> tuple[float, float]:
        """(seconds until `bucket` can serve this request, its level now)."""
        if bucket.dimension == CONCURRENCY:
            free = float(bucket.limit - self._held.get(bucket.id, 0))
            return (0.0 if free >= 1 else CONCURRENCY_RETRY_S), free
        state = self._rates.get(bucket.id)
        limit = bucket.limit
        level = float(limit) if state is None else refill(state[0], state[1], limit, now)
        return wait_s(level, amount_for(bucket, tokens), bucket.limit), level

    def _take(self, ask: Ask, levels: Levels, now: float) -> Grant:
        leases: list[Bucket] = []
        reserved: list[tuple[Bucket, int]] = []
        for bucket in ask.buckets:
            level = levels[bucket.id][0]
            if bucket.dimension == CONCURRENCY:
                self._held[bucket.id] = self._held.get(bucket.id, 0) + 1
                leases.append(bucket)
                levels[bucket.id] = (level - 1, 0.0)
                continue
            amount = amount_for(bucket, ask.tokens)
            self._rates[bucket.id] = [level - amount, now]
            levels[bucket.id] = (level - amount, until_full_s(level - amount, bucket.limit))
            if bucket.dimension == TPM:
                reserved.append((bucket, amount))
        return Grant(
            id="",
            levels=levels,
            leases=tuple(leases),
            reserved=tuple(reserved),
        )
