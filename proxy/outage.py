"""`OutageFallback`: how `RedisLimiter` admits while Redis is unreachable (SPEC §6).

Owns the fallback decision (503 when fail_closed, else a process-local `LocalLimiter` sized
limit ÷ replicas), the budget usage last known, and the fallback's usage Redis has yet to count.
Must not do I/O nor import aiohttp/redis; sending the backlog is `RedisLimiter`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import errors
from .ratelimit import Ask, Bucket, Grant, LocalLimiter, Refusal


class OutageFallback:
    """Local admissions for when Redis cannot decide; see the module docstring."""

    def __init__(self, *, fail_closed: bool) -> None:
        self.fail_closed = fail_closed
        self.replicas = 1  # live replicas last seen in Redis: the divisor of every limit
        self.backlog: dict[str, int] = {}  # budget usage of fallback grants, not yet in Redis
        self._local = LocalLimiter()
        self._budget_seen: dict[str, int] = {}  # key -> last count Redis showed + own usage
        self._scaled: dict[Bucket, Bucket] = {}

    def admit(self, ask: Ask) -> Grant | Refusal:
        """SPEC §6 while Redis cannot answer: 503, or local buckets of limit ÷ replicas."""
        if self.fail_closed:
            raise errors.ratelimit_unavailable()
        key, budget = ask.budget_key, ask.budget_limit
        if key is not None and budget is not None and self._budget_seen.get(key, 0) >= budget:
            return Refusal(None, 0.0, {})
        return self._local.admit_now(Ask(self._scale(ask.buckets), ask.tokens, budget_key=key))

    def settle(self, grant: Grant, used: int) -> None:
        """Every settlement counts toward its budget; one of our own grants also returns its
        buckets and joins the backlog."""
        key = grant.budget_key
        if key is not None:
            self._budget_seen[key] = self._budget_seen.get(key, 0) + used
        if not grant.remote:
            self._local.settle(grant, used)
            if key is not None and used:
                self.backlog[key] = self.backlog.get(key, 0) + used

    def see_budget(self, key: str, used: int) -> None:
        """The usage Redis last counted for `key`."""
        self._budget_seen[key] = used

    def take_backlog(self) -> dict[str, int]:
        backlog, self.backlog = self.backlog, {}
        return backlog

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
