"""`Clock`: one upstream attempt's deadlines (first byte, idle, total) on one shared-timer
`Deadline`, and how long a client may take to accept bytes.

Owns the arithmetic of when an attempt's wait runs out; the waiting itself is `forward`'s.
"""

from __future__ import annotations

import asyncio

from . import errors
from .config import Timeouts
from .deadlines import deadline_at
from .errors import GatewayError


class Clock:
    """One attempt's deadlines on one `Deadline`: first byte, then idle, under total.

    `idle_s` runs only while the gateway waits on the upstream: while a write waits for the
    client to take bytes, the client has `client_stall_s` instead.
    """

    # A client on which one write has waited this long (it took no bytes, or too few to drain the
    # send buffer) is dropped: it holds an upstream connection and a slot of the account's
    # concurrency. A constant until the config has a place for it; nginx's send_timeout default.
    client_stall_s = 60.0

    __slots__ = ("loop", "timeouts", "total_at", "timer", "data_seen", "last_data", "client_since")

    def __init__(self, timeouts: Timeouts) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeouts = timeouts
        now = self.loop.time()
        self.total_at = now + timeouts.total_s
        self.timer = deadline_at(min(self.total_at, now + timeouts.first_byte_s))
        self.data_seen = False
        self.last_data = now  # since when the gateway has been waiting on the upstream
        self.client_since: float | None = None  # when the write now waiting on the client began

    def due(self) -> float:
        """When the wait going on runs out: `idle_s` after the last data while reading;
        `client_stall_s` after the write began while writing, looked at again within `idle_s`
        so that once the write ends the idle deadline is not missed."""
        if self.client_since is None:
            return min(self.total_at, self.last_data + self.timeouts.idle_s)
        return min(
            self.total_at,
            self.client_since + self.client_stall_s,
            self.loop.time() + self.timeouts.idle_s,
        )

    def tick(self) -> None:
        """Data arrived: the next chunk is due within `idle_s`."""
        self.data_seen = True
        self.timer.reschedule(min(self.total_at, self.loop.time() + self.timeouts.idle_s))

    def expired(self) -> GatewayError:
        if self.loop.time() >= self.total_at:
            return errors.upstream_timeout(f"over total_s={self.timeouts.total_s:g}")
        if not self.data_seen:
            return errors.upstream_timeout(f"no first byte within {self.timeouts.first_byte_s:g}s")
        return errors.upstream_timeout(f"no data for idle_s={self.timeouts.idle_s:g}")
