"""Deadlines for many concurrent tasks on one event-loop timer: `deadline_at(when)` behaves like
`asyncio.timeout_at(when)` (an async context manager that turns its own expiry into
TimeoutError, with `reschedule`), without arming a timer per use.

A deadline may also move on its own: with `due`, its time coming only means "ask again". `due()`
then says when it really is, and a later answer puts it back on the timer, cancelling nothing.
A caller whose deadline moves often (data per chunk) just notes the time, so nothing is re-armed
per chunk, and what the deadline guards is never interrupted before it is really due.

`asyncio.timeout_at` arms a timer each time (under uvloop a libuv timer is allocated, started,
stopped and closed): about 5 µs per upstream attempt. Here a deadline joins the set of its
`RESOLUTION_S` slot, and one timer per loop wakes at the earliest slot that holds any: a
deadline costs a set insert and a discard. A deadline fires at most `RESOLUTION_S` late (and,
like asyncio's own timers, up to the loop's clock resolution early).
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable
from types import TracebackType

RESOLUTION_S = 0.01
_EARLY_S = 0.001  # tolerance of the loop's timers (they may wake this much before their time)


class Deadlines:
    """Every pending deadline of one event loop, by slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._slots: dict[int, set[Deadline]] = {}  # slot -> deadlines due in it (kept while empty)
        self._due: list[int] = []  # the slots of _slots, as a heap
        self._timer: asyncio.TimerHandle | None = None
        self._timer_slot = 0

    def add(self, deadline: Deadline) -> None:
        slot = math.ceil(deadline.when / RESOLUTION_S)
        deadline.slot = slot
        members = self._slots.get(slot)
        if members is None:
            members = self._slots[slot] = set()
            heapq.heappush(self._due, slot)
            if self._timer is None or slot < self._timer_slot:
                self._arm(slot)
        members.add(deadline)

    def discard(self, deadline: Deadline) -> None:
        members = self._slots.get(deadline.slot)
        if members is not None:
            members.discard(deadline)

    def _arm(self, slot: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_slot = slot
        self._timer = self._loop.call_at(slot * RESOLUTION_S, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time() + _EARLY_S
        due = self._due
        while due and due[0] * RESOLUTION_S <= now:
            for deadline in self._slots.pop(heapq.heappop(due)):
                deadline.expire(now)
        # a deadline that moved was added back, which may have armed the timer already
        if due and (self._timer is None or self._timer_slot != due[0]):
            self._arm(due[0])


class Deadline:
    """One use of a deadline, entered once, like `asyncio.Timeout`."""

    __slots__ = ("when", "slot", "_deadlines", "_due", "_task", "_cancelling", "_expired", "_active")

    def __init__(
        self, deadlines: Deadlines, when: float, due: Callable[[], float] | None = None
    ) -> None:
        self.when = when
        self.slot = 0
        self._deadlines = deadlines
        self._due = due
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._expired = False
        self._active = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task, self._cancelling, self._active = task, task.cancelling(), True
        self._deadlines.add(self)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._active = False
        self._deadlines.discard(self)
        if self._expired:
            assert self._task is not None
            # as asyncio.Timeout: our cancel is withdrawn; the CancelledError is ours to turn
            # into TimeoutError unless someone else cancelled the task meanwhile
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def reschedule(self, when: float) -> None:
        """Moves the deadline (later or earlier); only while it has not expired."""
        if self._expired:
            return
        self.when = when
        if self._active:
            self._deadlines.discard(self)
            self._deadlines.add(self)

    def expire(self, now: float) -> None:
        """Its time came (`now`, with the timers' tolerance): cancels the task, unless `due`
        moves the deadline past `now`."""
        if not self._active or self._expired:
            return
        if self._due is not None:
            when = self._due()
            if when > now:
                self.when = when
                self._deadlines.add(self)
                return
        self._expired = True
        assert self._task is not None
        self._task.cancel()

    @property
    def expired(self) -> bool:
        return self._expired


_wheel: tuple[asyncio.AbstractEventLoop | None, Deadlines | None] = (None, None)


def deadline_at(when: float, *, due: Callable[[], float] | None = None) -> Deadline:
    """A deadline at loop time `when`, on the running loop's shared timer; with `due`, one that
    asks `due()` when its time comes and, if the answer is later, waits for that instead."""
    global _wheel
    loop = asyncio.get_running_loop()
    owner, deadlines = _wheel
    if owner is not loop or deadlines is None:
        deadlines = Deadlines(loop)
        _wheel = (loop, deadlines)
    return Deadline(deadlines, when, due)
