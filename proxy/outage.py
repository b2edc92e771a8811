"""`OutageFallback`: how `RedisLimiter` admits while Redis is unreachable (SPEC §6).

Owns the fallback decision (503 when fail_closed, else a process-local `LocalLimiter` sized
limit ÷ replicas) and the budget usage last known per key and period. Must not do I/O nor import
aiohttp/redis; the usage Redis has yet to count is `RedisLimiter`'s, which sends it when it can.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import errors
from .ratelimit import Ask, Bucket, Grant, LocalLimiter, Refusal
from .usage import Charge


class OutageFallback:
    """Local admissions for when Redis cannot decide; see the module docstring."""

    def __init__(self, *, fail_closed: bool) -> None:
        self.fail_closed = fail_closed
        self.replicas = 1  # live replicas last seen in Redis: the divisor of every limit
        self._local = LocalLimiter()
        # (key, period) -> [tokens, nano-dollars]: the last count Redis showed + own usage since
        self._budget_seen: dict[tuple[str, str], list[int]] = {}
        self._scaled: dict[Bucket, Bucket] = {}

    def admit(self, ask: Ask) -> Grant | Refusal:
        """SPEC §6 while Redis cannot answer: 503, or local buckets of limit ÷ replicas."""
        if self.fail_closed:
            raise errors.ratelimit_unavailable()
        budget = ask.budget
        if budget is not None:
            seen = self._budget_seen.get((budget.key, budget.period))
            if seen is not None and (spent := budget.spent(seen[0], seen[1])):
                return Refusal(None, 0.0, {}, spent)
        return self._local.admit_now(Ask(self._scale(ask.buckets), ask.tokens))

    def settle(self, grant: Grant, used: int) -> None:
        """One of our own grants returns its local buckets."""
        if not grant.remote:
            self._local.settle(grant, used)

    def record(self, charge: Charge) -> None:
        """Every settled request counts toward its budget's last known count."""
        seen = self._budget_seen.setdefault((charge.key, charge.period.id), [0, 0])
        seen[0] += charge.tokens
        seen[1] += charge.cost_nano or 0

    def see_budget(self, key: str, period: str, tokens: int, nano_usd: int) -> None:
        """The usage Redis last counted for `key` in `period`."""
        self._budget_seen[key, period] = [tokens, nano_usd]

    def see_replicas(self, count: int) -> None:
        """A heartbeat's count of live replicas; the local buckets are resized on next use."""
        if count != self.replicas:
            self.replicas = count
            self._scaled = {}

    def _scale(self, buckets: Sequence[Bucket]) -> tuple[Bucket, ...]:
        scaled = []
        for bucket in buckets:
            local = self._scaled.get(bucket)
            if local is None:
                limit = max(1, bucket.limit // self.replicas)
                local = Bucket(bucket.scope, bucket.name, bucket.dimension, limit)
                self._scaled[bucket] = local
            scaled.append(local)
        return tuple(scaled)
