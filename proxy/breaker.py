"""Circuit breaker state machine for one account or one provider, and its sliding window.

Owns the CLOSED → OPEN → HALF_OPEN transitions (SPEC §5) as pure logic driven by the caller's
`now`. Must not do I/O, read a clock, or import aiohttp/redis.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass

from .config import BreakerConfig

# Re-opening doubles the open time; past 2^32 the cap has long since taken over, and an unbounded
# exponent would overflow the float.
_MAX_DOUBLINGS = 32
# Bucket count bound: one-second buckets up to this many, wider buckets beyond it.
_MAX_BUCKETS = 120


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"  # neither: account faults, a client that went away on a non-probe


@dataclass(slots=True, eq=False)
class Ticket:
    """One pass through a breaker. `epoch` ties it to the stretch of state it was issued in."""

    epoch: int
    probe: bool
    started: float
    done: bool = False


class SlidingWindow:
    """Two counters summed over the last `window_s`, kept in a ring of time buckets.

    O(1) amortised: each bucket is cleared once per lap. The window covers the current, partial
    bucket plus the full ones before it, so its span is between window_s − width and window_s.
    """

    __slots__ = ("_width", "_first", "_second", "_sum_first", "_sum_second", "_head")

    def __init__(self, window_s: float) -> None:
        count = max(1, min(_MAX_BUCKETS, math.ceil(window_s)))
        self._width = max(window_s, 1e-9) / count
        self._first = [0] * count
        self._second = [0] * count
        self._sum_first = 0
        self._sum_second = 0
        self._head: int | None = None

    def add(self, now: float, first: int = 0, second: int = 0) -> None:
        index = self._advance(now) % len(self._first)
        self._first[index] += first
        self._second[index] += second
        self._sum_first += first
        self._sum_second += second

    def totals(self, now: float) -> tuple[int, int]:
        self._advance(now)
        return self._sum_first, self._sum_second

    def _advance(self, now: float) -> int:
        bucket = math.floor(now / self._width)
        head = self._head
        if head is None or bucket - head >= len(self._first):
            self._clear()
        elif bucket > head:
            for step in range(head + 1, bucket + 1):
                index = step % len(self._first)
                self._sum_first -= self._first[index]
                self._sum_second -= self._second[index]
                self._first[index] = self._second[index] = 0
        else:
            # A clock that stepped back counts into the newest bucket rather than rewriting history.
            return head
        self._head = bucket
        return bucket

    def _clear(self) -> None:
        count = len(self._first)
        self._first = [0] * count
        self._second = [0] * count
        self._sum_first = self._sum_second = 0


class Breaker:
    """One circuit breaker. The first probe SUCCESS closes it; any probe FAILURE re-opens it.

    A ticket only counts in the epoch (the stretch between two transitions) it was issued in;
    outcomes of older tickets, e.g. a slow request that started before the breaker opened, are
    dropped whatever the state now is.
    """

    __slots__ = (
        "_config", "_rng", "_probe_timeout_s", "_state", "_epoch", "_consecutive",
        "_window", "_reopens", "_open_until", "_probes",
    )

    def __init__(
        self, *, config: BreakerConfig, rng: random.Random, probe_timeout_s: float
    ) -> None:
        self._config = config
        self._rng = rng
        self._probe_timeout_s = probe_timeout_s
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._consecutive = 0
        self._window = SlidingWindow(config.window_s)
        self._reopens = 0
        self._open_until = 0.0
        self._probes: list[Ticket] = []

    @property
    def config(self) -> BreakerConfig:
        return self._config

    def reconfigure(self, config: BreakerConfig, *, probe_timeout_s: float | None = None) -> None:
        """Apply a reloaded config, keeping the state; the window restarts if its span changed."""
        if config.window_s != self._config.window_s:
            self._window = SlidingWindow(config.window_s)
        self._config = config
        if probe_timeout_s is not None:
            self._probe_timeout_s = probe_timeout_s

    def state(self, now: float) -> BreakerState:
        self._refresh(now)
        return self._state

    def can_pass(self, now: float) -> bool:
        if self._state is BreakerState.CLOSED:  # nothing to refresh (the common case, kept cheap)
            return True
        self._refresh(now)  # open -> half-open, or an expired probe re-opens: never closes
        return self._state is BreakerState.HALF_OPEN and len(self._probes) < self._probe_slots()

    def enter(self, now: float) -> Ticket | None:
        if not self.can_pass(now):
            return None
        probe = self._state is BreakerState.HALF_OPEN
        ticket = Ticket(epoch=self._epoch, probe=probe, started=now)
        if probe:
            self._probes.append(ticket)
        return ticket

    def record(self, ticket: Ticket, outcome: Outcome, now: float) -> None:
        if ticket.done:
            return
        ticket.done = True
        # Expiry first: a probe recorded after its deadline failed, however late we look.
        self._refresh(now)
        if ticket.epoch != self._epoch:
            return
        if self._state is BreakerState.CLOSED:
            self._record_closed(outcome, now)
        elif self._state is BreakerState.HALF_OPEN and ticket.probe:
            self._probes.remove(ticket)
            if outcome is Outcome.SUCCESS:
                self._close()
            elif outcome is Outcome.FAILURE:
                self._reopen(now)

    def retry_at(self, now: float) -> float | None:
        self._refresh(now)
        return self._open_until if self._state is BreakerState.OPEN else None

    def _probe_slots(self) -> int:
        return max(1, self._config.half_open_probes)

    def _record_closed(self, outcome: Outcome, now: float) -> None:
        if outcome is Outcome.NEUTRAL:
            return
        failed = outcome is Outcome.FAILURE
        self._consecutive = self._consecutive + 1 if failed else 0
        self._window.add(now, 1, int(failed))
        if not failed:
            return
        total, failures = self._window.totals(now)
        config = self._config
        by_rate = total >= config.min_requests and failures >= config.failure_rate * total
        if self._consecutive >= config.consecutive_failures or by_rate:
            self._open(now)

    def _refresh(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._open_until:
            self._transition(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN:
            deadline = now - self._probe_timeout_s
            if any(probe.started <= deadline for probe in self._probes):
                self._reopen(now)

    def _open(self, now: float) -> None:
        config = self._config
        base = min(config.max_open_s, config.open_s * 2.0 ** min(self._reopens, _MAX_DOUBLINGS))
        self._open_until = now + base * self._rng.uniform(0.8, 1.2)
        self._transition(BreakerState.OPEN)

    def _reopen(self, now: float) -> None:
        self._reopens += 1
        self._open(now)

    def _close(self) -> None:
        self._reopens = 0
        self._window = SlidingWindow(self._config.window_s)
        self._transition(BreakerState.CLOSED)

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._epoch += 1
        self._consecutive = 0
        self._probes = []
