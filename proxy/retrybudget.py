"""The retry budget of SPEC §5: retries may be a share of recent first attempts plus a floor.

Owns the counting and the allow/refuse decision only. Pure: takes `now`, no I/O, no clock, no
aiohttp/redis; one instance per process (not shared through Redis).
"""

from __future__ import annotations

from .breaker import SlidingWindow


class RetryBudget:
    """Allows a retry while retries in the window < ratio × first attempts + min_per_s × window."""

    __slots__ = ("_ratio", "_floor", "_window")

    def __init__(self, *, ratio: float, min_per_s: float, window_s: float = 10.0) -> None:
        self._ratio = ratio
        self._floor = min_per_s * window_s
        self._window = SlidingWindow(window_s)

    def record_first(self, now: float) -> None:
        self._window.add(now, first=1)

    def try_retry(self, now: float) -> bool:
        """Records the retry and returns True when the budget allows it; else changes nothing."""
        firsts, retries = self._window.totals(now)
        if retries >= self._ratio * firsts + self._floor:
            return False
        self._window.add(now, second=1)
        return True
