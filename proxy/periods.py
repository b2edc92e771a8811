"""Budget periods (SPEC §12): which period an instant belongs to, and the clock periods are read on.

Pure UTC calendar arithmetic over Unix seconds (total, daily, weekly from Monday, monthly), and
`PeriodClock`, the one source of "now" for periods, set to the shared store's server time when
there is one. Imports nothing of the app; no I/O.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone

KINDS = ("total", "daily", "weekly", "monthly")
# A closed period stays in the store through the period after it (the report's "previous") and
# this long again, then expires.
RETAIN_S = 35 * 86400
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class Period:
    """One budget period: [start, end) in Unix seconds; `total` is (-inf, inf)."""

    id: str  # part of the counter's name: "total", "day:2026-12-01", "week:2026-11-30", "month:2026-12"
    start: float
    end: float
    expire_at: int  # Unix seconds after which the store may forget its counters; 0: never


TOTAL = Period("total", -math.inf, math.inf, 0)


def period_at(kind: str, now: float) -> Period:
    """The period of `kind` that holds the instant `now` (a boundary belongs to the new period)."""
    if kind == "total":
        return TOTAL
    day = datetime.fromtimestamp(now, timezone.utc).date()
    if kind == "daily":
        start, end, name = day, day + timedelta(days=1), f"day:{day.isoformat()}"
    elif kind == "weekly":
        start = day - timedelta(days=day.weekday())
        end, name = start + timedelta(days=7), f"week:{start.isoformat()}"
    elif kind == "monthly":
        start = day.replace(day=1)
        end = date(start.year + start.month // 12, start.month % 12 + 1, 1)
        name = f"month:{start.year:04d}-{start.month:02d}"
    else:
        raise ValueError(f"unknown budget period {kind!r}")
    start_s, end_s = _seconds(start), _seconds(end)
    return Period(name, start_s, end_s, int(end_s + (end_s - start_s) + RETAIN_S))


def previous_period(kind: str, now: float) -> Period | None:
    """The period before the one holding `now`; None for `total`, which has none."""
    if kind == "total":
        return None
    return period_at(kind, period_at(kind, now).start - 1)


def iso(seconds: float) -> str | None:
    """A period bound as ISO 8601 UTC text; None for the open ends of `total`."""
    if not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _seconds(day: date) -> float:
    return (datetime(day.year, day.month, day.day, tzinfo=timezone.utc) - _EPOCH).total_seconds()


class PeriodClock:
    """Now, for budget periods: the wall clock plus the shared store's offset from it.

    With Redis, every replica reads periods on Redis' clock (the one the limiter script already
    uses), so a boundary passes on all of them at once, within a round trip, whatever their own
    clocks say. `shift_s` moves this clock alone, so tests can cross a boundary without waiting.
    """

    __slots__ = ("_wall", "offset_s", "shift_s", "_current")

    def __init__(self, *, wall: Callable[[], float] = time.time, shift_s: float = 0.0) -> None:
        self._wall = wall
        self.offset_s = 0.0  # the store's clock minus the wall clock, last measured
        self.shift_s = shift_s
        self._current: dict[str, Period] = {}

    def now(self) -> float:
        return self._wall() + self.offset_s + self.shift_s

    def wall(self) -> float:
        """The wall clock alone, to time a read of the server's clock."""
        return self._wall()

    def current(self, kind: str) -> Period:
        """The period of `kind` now; computed again only once the cached one has ended."""
        if kind == "total":
            return TOTAL
        now = self.now()
        cached = self._current.get(kind)
        if cached is None or not cached.start <= now < cached.end:
            cached = self._current[kind] = period_at(kind, now)
        return cached

    def see_server_time(self, server_s: float, sent_at: float, received_at: float) -> None:
        """A server time read between two wall-clock instants: the offset is taken at their middle."""
        self.offset_s = server_s - (sent_at + received_at) / 2
