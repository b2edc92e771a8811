"""Running the gateway: the event loop, the listening socket, signals and the graceful drain.

SIGTERM/SIGINT: `/readyz` turns 503 at once, traffic is still served for `drain_delay_s`, then
new requests get 503 `draining` while in-flight ones get `shutdown_grace_s` to finish; what is
left is ended (streams with an error event) and the process exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import resource
import signal

import prometheus_client
import uvloop
from aiohttp import web

from .accesslog import AccessLog
from .app import build_app
from .config import Config, ConfigError, ServerConfig
from .configfile import load_config
from .edge import GatewayRunner
from .state import STATE, ServerState

log = logging.getLogger("llm_proxy.server")

# Python's collector runs generation 0 after every 700 net allocations of container objects:
# under load that is about once a request, and every 100th run walks every object of the
# process for tens of milliseconds. A request's objects are freed by reference counting (almost
# none are cyclic garbage), so start-up objects are frozen out of collections and generation 0
# waits for this many allocations. Measured: about 15 % of the CPU per request, and the p99
# latency spikes of the full collections.
GC_GEN0_THRESHOLD = 20_000
EXIT_CANNOT_LISTEN = 1


def serve(config: Config, *, path: str, file_config: Config, workers: int = 1) -> int:
    """Runs one gateway process until SIGTERM/SIGINT; SIGHUP reloads `path`.

    `config` is `file_config` with the command line's overrides applied.
    """
    logging.basicConfig(
        level=config.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # halves the series; `_created` helps no dashboard
    raise_open_files_limit()
    try:
        uvloop.run(_serve(config, path=path, file_config=file_config, workers=workers))
    except CannotListen as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_LISTEN
    return 0


class CannotListen(Exception):
    """The address could not be bound: one line names it, instead of a traceback."""


async def _serve(config: Config, *, path: str, file_config: Config, workers: int) -> None:
    """`workers` > 1: this process is one of that many sharing the port."""
    access_log = AccessLog() if config.logging.access_log else None
    app = build_app(config, access_log=access_log, workers=workers)
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await _listen(runner, config.server, reuse_port=workers > 1)
        tune_gc()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, Reloader(app[STATE], path, file_config))
        await stop.wait()
        await drain(app[STATE])
    finally:
        await runner.cleanup()
    log.info("stopped")


async def _listen(runner: web.AppRunner, server: ServerConfig, *, reuse_port: bool) -> None:
    site = web.TCPSite(runner, server.host, server.port, backlog=2048, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        raise CannotListen(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None
    for address in runner.addresses:
        log.info("listening on %s", address)


def raise_open_files_limit() -> None:
    """Lifts the soft open-files limit to the hard one, as Go's runtime and nginx do: a soft limit
    of 1024 (systemd's default) would cap the gateway near 500 client connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        log.warning("open-files limit stays at %d (cannot raise it to %d: %s)", soft, hard, exc)
        return
    log.info("open-files limit raised from %d to %d", soft, hard)


def tune_gc() -> None:
    """Freezes what start-up built (config, modules, the app) and spaces out collections."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


class Reloader:
    """SIGHUP: serve the file's new config, or keep the old one when the new one is invalid.

    Compares with what the file said last time (not the running config, which holds the
    command line's --host/--port/--workers), to warn about what needs a restart.
    """

    def __init__(self, state: ServerState, path: str, started_with: Config) -> None:
        self.state = state
        self.path = path
        self.last = started_with

    def __call__(self) -> None:
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            log.error("reload refused, still serving the previous config: %s", "; ".join(exc.problems))
            return
        for section in ("server", "redis"):
            if getattr(config, section) != getattr(self.last, section):
                log.warning("reload: `%s` changed; it takes effect only after a restart", section)
        self.last = config
        current = self.state.gateway.config
        old = self.state.swap(dataclasses.replace(config, server=current.server, redis=current.redis))
        self.state.spawn(self.state.retire(old))
        log.info("reloaded %s", self.path)


async def drain(state: ServerState) -> None:
    server = state.server
    state.ready = False
    log.info("draining: readyz now 503, serving for %gs more", server.drain_delay_s)
    await asyncio.sleep(server.drain_delay_s)
    state.draining = True
    log.info("draining: refusing new requests, %d in flight", len(state.inflight))
    if await state.wait_idle(server.shutdown_grace_s):
        return
    log.warning("shutdown grace over: ending %d requests", len(state.inflight))
    for task, call in list(state.inflight.items()):
        call.ended_by_shutdown = True
        task.cancel()
    await state.wait_idle(1.0)
