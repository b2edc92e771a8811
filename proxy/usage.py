"""Usage per key, period and model (SPEC §12): one settled request's `Charge`, and `UsageLedger`,
the sums the budgets are checked against and the usage report reads.

In process the ledger is the store; with Redis it holds what is not in Redis yet. Pure data: no
I/O, no clock, nothing of aiohttp or redis.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .periods import Period

# A model's row: requests, prompt, cached (cache reads), cache-write and completion tokens, cost in
# nano-dollars, and requests with no price. Each is one Redis hash field `<letter>|<model>`.
ROW_FIELDS = ("r", "p", "k", "w", "o", "c", "u")
# A key's period totals, what its budgets count: tokens, and cost in nano-dollars.
TOKENS_FIELD, COST_FIELD = "t", "c"


@dataclass(slots=True)
class Charge:
    """What one settled request counts against its key, for the period it was admitted in."""

    key: str
    period: Period
    model: str  # the model the client asked for (a fallback's cost is priced at the fallback's)
    prompt: int
    cached: int
    cache_write: int
    completion: int
    tokens: int  # what the token budget counts: prompt + completion
    cost_nano: int | None  # None: the model that served has no price


class PeriodUsage:
    """One key's usage in one period: its budget totals and a row per model."""

    __slots__ = ("tokens", "cost_nano", "models")

    def __init__(self) -> None:
        self.tokens = 0
        self.cost_nano = 0
        self.models: dict[str, list[int]] = {}

    def add(self, charge: Charge) -> None:
        """Figures are bounded where they are made (usage at 2^40 tokens, cost at
        `cost.MAX_COST_NANO`), so sums stay exact in Lua's doubles and encodable."""
        cost = charge.cost_nano or 0
        self.tokens += charge.tokens
        self.cost_nano += cost
        row = self.models.get(charge.model)
        if row is None:
            row = self.models[charge.model] = [0] * len(ROW_FIELDS)
        row[0] += 1
        row[1] += charge.prompt
        row[2] += charge.cached
        row[3] += charge.cache_write
        row[4] += charge.completion
        row[5] += cost
        if charge.cost_nano is None:
            row[6] += 1

    def fields(self) -> Iterator[tuple[str, int]]:
        """Every non-zero figure as (Redis hash field, amount)."""
        if self.tokens:
            yield TOKENS_FIELD, self.tokens
        if self.cost_nano:
            yield COST_FIELD, self.cost_nano
        for model, row in self.models.items():
            for letter, amount in zip(ROW_FIELDS, row):
                if amount:
                    yield f"{letter}|{model}", amount

    @classmethod
    def from_fields(cls, fields: Mapping[str, int]) -> PeriodUsage:
        """The inverse of `fields`, from what a Redis hash holds."""
        usage = cls()
        for name, amount in fields.items():
            if name == TOKENS_FIELD:
                usage.tokens = amount
            elif name == COST_FIELD:
                usage.cost_nano = amount
            elif name[1:2] == "|" and name[0] in ROW_FIELDS:
                row = usage.models.setdefault(name[2:], [0] * len(ROW_FIELDS))
                row[ROW_FIELDS.index(name[0])] = amount
        return usage


class UsageLedger:
    """`PeriodUsage` by (key name, period id), with when each period may be forgotten."""

    __slots__ = ("periods", "expiry")

    def __init__(self) -> None:
        self.periods: dict[tuple[str, str], PeriodUsage] = {}
        self.expiry: dict[tuple[str, str], int] = {}

    def __bool__(self) -> bool:
        return bool(self.periods)

    def add(self, charge: Charge) -> None:
        where = (charge.key, charge.period.id)
        usage = self.periods.get(where)
        if usage is None:
            usage = self.periods[where] = PeriodUsage()
            self.expiry[where] = charge.period.expire_at
        usage.add(charge)

    def spent(self, key: str, period: str) -> tuple[int, int]:
        """(tokens, nano-dollars) recorded for `key` in `period`."""
        usage = self.periods.get((key, period))
        return (0, 0) if usage is None else (usage.tokens, usage.cost_nano)

    def take(self) -> UsageLedger:
        """Everything recorded so far, leaving this ledger empty."""
        taken = UsageLedger()
        taken.periods, self.periods = self.periods, {}
        taken.expiry, self.expiry = self.expiry, {}
        return taken
