"""`ServerState`: what lives as long as the process — the current Gateway, readiness, drain, in-flight.

A config reload swaps `gateway`; requests keep the one they started with. Holds no request logic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from .accesslog import AccessLog
from .call import Call
from .config import Config, ServerConfig
from .gateway import Gateway


class ServerState:
    """The app's process-wide state, under the `STATE` app key."""

    def __init__(self, *, server: ServerConfig, gateway: Gateway, access_log: AccessLog | None) -> None:
        self.server = server
        self.gateway = gateway
        self.access_log = access_log
        self.ready = False
        self.draining = False
        self.inflight: dict[asyncio.Task[object], Call] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Runs background work, holding a reference so the task is not collected midway."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def enter(self, task: asyncio.Task[object], call: Call) -> None:
        self.inflight[task] = call
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self.inflight.pop(task, None)
        if not self.inflight:
            self._idle.set()

    def swap(self, config: Config) -> Gateway:
        """Serves `config` from now on; requests in flight finish on the Gateway they started with.

        Returns the previous Gateway, whose retired providers `retire` closes once unused.
        """
        old = self.gateway
        self.gateway = Gateway(
            config=config, limiter=old.limiter, divisor=old.divisor, metrics=old.metrics, previous=old
        )
        return old

    async def retire(self, old: Gateway, *, poll_s: float = 1.0, limit_s: float = 3600.0) -> None:
        """Closes what only `old` still used, once no request in flight holds it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        while any(call.gateway is old for call in self.inflight.values()) and loop.time() < deadline:
            await asyncio.sleep(poll_s)
        for provider in self.gateway.retired_from(old):
            await provider.close()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Whether every in-flight request finished within `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True


STATE = web.AppKey("state", ServerState)
