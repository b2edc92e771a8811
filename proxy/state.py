"""`ServerState`: what lives as long as the process — the current Gateway, readiness, drain, in-flight.

A config reload swaps `gateway`; requests keep the one they started with. Holds no request logic.
"""

from __future__ import annotations

import asyncio

from .accesslog import AccessLog
from .call import Call
from .config import ServerConfig
from .gateway import Gateway


class ServerState:
    def __init__(self, *, server: ServerConfig, gateway: Gateway, access_log: AccessLog | None) -> None:
        self.server = server
        self.gateway = gateway
        self.access_log = access_log
        self.ready = False
        self.draining = False
        self.inflight: dict[asyncio.Task[object], Call] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, task: asyncio.Task[object], call: Call) -> None:
        self.inflight[task] = call
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self.inflight.pop(task, None)
        if not self.inflight:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether every in-flight request finished within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
