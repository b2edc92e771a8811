"""The HTTP edge under the routes: how long a connection may wait, and what malformed input gets.

aiohttp's server with each connection handled by `Connection`: the first request head is due
`header_timeout_s` after accept (later ones within `keepalive_s` of the previous answer, by
aiohttp's own keep-alive timer), a malformed request gets the contract's JSON 400 and a log line
that quotes none of its bytes, and a connection past what the open-files limit leaves room for is
closed at once, logged and counted. Knows nothing of keys, models or upstreams.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import sys
import time
import traceback
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from prometheus_client import CollectorRegistry, Counter

from . import errors
from .config import ServerConfig
from .pipeline import request_id_of

# Kept free for what is not a client connection: the listening socket, Redis, logs, the loop.
FD_RESERVE = 64
REFUSAL_LOG_EVERY_S = 60.0


class WithoutRequestText(logging.Filter):
    """aiohttp logs a bad request with its exception, whose text quotes the raw request (a gateway
    key with it): the line stays and names what was wrong; the exception's text goes, and of a
    handler's failure only the traceback's frames (code, not data) are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None:
            return True
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({describe(exc)})"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        if not isinstance(exc, HttpProcessingError):
            frames = "".join(traceback.format_tb(exc.__traceback__))
            record.exc_text = f"Traceback (its message withheld: it may quote the request):\n{frames}"
        return True


log = logging.getLogger("llm_proxy.edge")
log.addFilter(WithoutRequestText())


def describe(exc: BaseException) -> str:
    """What was wrong, for a log line: `malformed request: Bad status line`, or the type's name."""
    if isinstance(exc, HttpProcessingError):
        return f"malformed request: {reason_of(exc)}"
    return type(exc).__name__


def reason_of(exc: HttpProcessingError) -> str:
    """The parser's reason without the bytes it quotes (`Invalid header value char`)."""
    reason = str(exc.message).split(":", 1)[0].strip()
    if 0 < len(reason) <= 80 and all(c.isalnum() or c in " -_" for c in reason):
        return reason
    return type(exc).__name__


def connection_cap() -> int:
    """Client connections the open-files limit leaves room for: each may hold an upstream
    connection too, and FD_RESERVE descriptors stay free for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return max(1, (soft - FD_RESERVE) // 2)


class Edge:
    """What the connections of one server share: the head deadline and the connection cap."""

    def __init__(self, *, header_timeout_s: float, max_open: int, refused: Counter | None) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_open = max_open
        self.open = 0
        self._refused = refused
        self._unlogged = 0
        self._logged_at = -math.inf

    @classmethod
    def for_server(cls, server: ServerConfig, registry: CollectorRegistry | None) -> Edge:
        refused = None
        if registry is not None:
            refused = Counter(
                "llm_proxy_connections_refused_total",
                "Client connections closed at accept: the open-files limit was near.",
                registry=registry,
            )
        return cls(header_timeout_s=server.header_timeout_s, max_open=connection_cap(), refused=refused)

    def admit(self) -> bool:
        if self.open < self.max_open:
            self.open += 1
            return True
        self._refuse()
        return False

    def release(self) -> None:
        self.open -= 1

    def _refuse(self) -> None:
        """Counts every refusal; logs one line a minute at most, with how many it stands for."""
        if self._refused is not None:
            self._refused.inc()
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at < REFUSAL_LOG_EVERY_S:
            return
        log.warning(
            "refusing new connections: %d are open, all the open-files limit leaves room for "
            "(%d refused since the last such line); raise the limit (ulimit -n, LimitNOFILE)",
            self.open, self._unlogged,
        )
        self._logged_at, self._unlogged = now, 0


class Connection(RequestHandler):
    """One client connection: aiohttp's handler with a deadline for its first request head, a
    place under the connection cap, and the contract's JSON for what aiohttp answers itself."""

    __slots__ = ("_edge", "_head_timer", "_admitted")

    def __init__(self, manager: web.Server, *, edge: Edge, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._edge = edge
        self._head_timer: asyncio.TimerHandle | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._edge.admit():
            transport.close()  # before anything is read: this descriptor is needed elsewhere
            return
        self._admitted = True
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._edge.header_timeout_s, self._head_overdue)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._admitted:
            return
        self._admitted = False
        self._edge.release()
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        self._head_timer = None
        # aiohttp's count of request heads parsed on this connection, read once per connection
        # (a hook per request would cost every request); a trickled head has not raised it
        if self._request_count == 0:
            self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, or to a handler that raised."""
        if status == 400:
            self.logger.info("refused a request from %s", request.remote, exc_info=exc)
            reason = reason_of(exc) if isinstance(exc, HttpProcessingError) else "not HTTP/1.1"
            error = errors.malformed_request(reason)
        else:
            self.logger.error("a request handler failed", exc_info=exc)
            error = errors.internal_error()
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; the connection is closed instead")
        response = web.Response(
            status=error.status,
            body=error.body(),
            content_type="application/json",
            headers={"x-request-id": request_id_of(request)},
        )
        response.force_close()
        return response


class GatewayServer(web.Server):
    """aiohttp's low-level server, handing each new connection to a `Connection`."""

    def __init__(self, handler: Any, *, edge: Edge, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.edge = edge

    def __call__(self) -> RequestHandler:
        # what aiohttp's own __call__ does, with this module's handler class
        return Connection(self, edge=self.edge, loop=self._loop, **self._kwargs)


EDGE = web.AppKey("edge", Edge)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GatewayServer`: how `serve` (and the tests) run the app."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()  # runs the app's start-up, builds aiohttp's server
        return GatewayServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            edge=self.app[EDGE],
            **server._kwargs,
        )
