"""A lean HTTP/1.1 client for upstream calls: pooled keep-alive connections, bodies as they come.

aiohttp's client takes about 60 % of a bare pass-through's CPU on each request (request
and response objects, header multidicts built twice, URL handling, timers, tracing hooks). Here
a request is one bytes object written to a pooled connection, and the answer is parsed where it
arrives, in the protocol's `data_received`: the head with bytes operations, the body framed by
Content-Length, chunked transfer coding or the connection's end (RFC 9112 §6), handed to the
reader chunk by chunk. The reader falling behind pauses the socket.

Only what upstream calls need: one request at a time per connection, a Content-Length request
body, http and https (TLS through the event loop, verified with the default context).
Every failure is an `UpstreamFailure`: `connect` when no connection was made, else `bad_response`.
Deadlines are the caller's: cancelling a request or a read leaves its connection to be aborted.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import cast
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

from .httpmessage import (
    CHUNKED,
    LENGTH,
    LOW_WATER,
    NONE,
    UNTIL_CLOSE,
    ChunkedDecoder,
    Response,
    UpstreamFailure,
    framing,
    parse_head,
)

__all__ = ["HIGH_WATER", "Pool", "Response", "UpstreamFailure"]

MAX_HEAD = 64 * 1024  # status line and header fields
HIGH_WATER = 256 * 1024  # unread body bytes at which the socket is paused (reads again at LOW_WATER)
SPLIT_WRITE = 64 * 1024  # bodies from this size are written after the head, not copied onto it


class _Stale(Exception):
    """A reused keep-alive connection closed by the upstream before any answer."""


class Pool:
    """Keep-alive connections to one origin (`base_url`'s scheme, host and port)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        secure = url.scheme == "https"
        self.host = url.hostname
        self.port = url.port or (443 if secure else 80)
        self.path = url.path.rstrip("/")  # the prefix of every request target
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._ssl = (ssl_context or ssl.create_default_context()) if secure else None
        self._host_line = b"Host: " + url.netloc.rpartition("@")[2].encode("idna") + b"\r\n"
        self._idle: dict[Connection, float] = {}  # idle since (monotonic), most recent last
        self._open: set[Connection] = set()
        self._closed = False

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def connections(self) -> int:
        return len(self._open)

    def target(self, path: str) -> bytes:
        """The request-target of `path` under `base_url`'s path."""
        return (self.path + path).encode()

    async def request(self, method: bytes, target: bytes, headers: bytes, body: bytes = b"") -> Response:
        """Sends `method` `target` with `headers` (whole `Name: value\\r\\n` lines) and `body`;
        returns once the answer's head has arrived."""
        head = b"%s %s HTTP/1.1\r\n%s%sContent-Length: %d\r\n\r\n" % (
            method, target, self._host_line, headers, len(body)
        )
        conn = self._reuse()
        if conn is not None:
            try:
                return await conn.exchange(head, body, method == b"HEAD")
            except _Stale:
                pass  # the upstream had closed it as it was taken: once more, on a fresh one
        conn = await self._connect()
        return await conn.exchange(head, body, method == b"HEAD")  # fresh: never _Stale

    async def close(self) -> None:
        """Closes every connection, idle or in use."""
        self._closed = True
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()

    def _reuse(self) -> Connection | None:
        idle = self._idle
        while idle:
            conn, since = idle.popitem()
            if time.monotonic() - since < self.keepalive_s and not conn.closing:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> Connection:
        if self._closed:
            raise UpstreamFailure("connect", "pool closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamFailure("connect", f"connect timeout after {self.connect_timeout_s:g}s") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamFailure("connect", f"{type(exc).__name__}: {exc}") from None
        self._open.add(conn)
        return conn

    def _release(self, conn: Connection) -> None:
        if self._closed or conn.closing:
            conn.abort()
            return
        now = time.monotonic()
        self._idle[conn] = now
        # the oldest idle connection, when past its keep-alive, closes now rather than on next use
        oldest = next(iter(self._idle))
        if now - self._idle[oldest] >= self.keepalive_s:
            del self._idle[oldest]
            oldest.abort()

    def _lost(self, conn: Connection) -> None:
        self._open.discard(conn)
        self._idle.pop(conn, None)


class Connection(asyncio.Protocol):
    """One upstream connection; parses each answer as its bytes arrive."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.reused = False  # has served an answer before
        self.keep_alive = False  # the current answer leaves the connection reusable
        self._response: Response | None = None
        self._head: asyncio.Future[None] | None = None  # resolved when the answer's head is in
        self._head_only = False  # the request was HEAD: no body follows
        self._received = False  # any byte of the current answer arrived
        self._rest = b""  # bytes received but not parsed yet
        self._framing = NONE
        self._remaining = 0  # LENGTH: body bytes to come
        self._chunked: ChunkedDecoder | None = None
        self._paused = False
        self._lost = False

    @property
    def closing(self) -> bool:
        return self._lost or self.transport is None or self.transport.is_closing()

    async def exchange(self, head: bytes, body: bytes, head_only: bool) -> Response:
        assert self.transport is not None and self._response is None
        if self.closing:  # closed by the upstream since it was opened or pooled
            if self.reused:
                raise _Stale()
            raise UpstreamFailure("reset", "connection closed before the request")
        response = self._response = Response(self)
        self._head = asyncio.get_running_loop().create_future()
        self._head_only = head_only
        self._received = False
        self._rest = b""
        if len(body) < SPLIT_WRITE:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)
        try:
            await self._head
        except BaseException:
            self._response = None
            self.abort()
            raise
        finally:
            self._head = None
        return response

    def release(self, response: Response) -> None:
        if self._response is not response:
            return
        self._response = None
        if response.done and response.error is None and self.keep_alive:
            self.reused = True
            self.resume()
            self.pool._release(self)
        else:
            self.abort()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            response = self._response
            if response is None or response.buffered <= LOW_WATER:
                self._paused = False
                self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.pool._lost(self)
        response = self._response
        if response is None:
            return
        if response.status == 0:
            if self.reused and not self._received:
                self._fail_head(_Stale())
            else:
                kind = "bad_response" if self._received else "reset"
                self._fail(f"connection closed before the answer's head ({_reason(exc)})", kind)
        elif self._framing == UNTIL_CLOSE:
            self.keep_alive = False
            response.finish()
        elif not response.done:
            self._fail(f"body cut: connection closed ({_reason(exc)})")

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or response.done:
            self.keep_alive = False  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        self._received = True
        if self._rest:
            data = self._rest + data
            self._rest = b""
        if response.status == 0:
            data = self._parse_head(response, data)
            if response.status == 0:
                return
        if data:
            self._feed(response, data)
        if response.buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost ends the answer

    # parsing

    def _parse_head(self, response: Response, data: bytes) -> bytes:
        """Parses the head out of `data` when it is complete; returns what follows it."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD:
                self._fail(f"answer head over {MAX_HEAD} bytes")
            else:
                self._rest = data
            return b""
        try:
            status, version_minor, headers = parse_head(data[:end])
        except ValueError as exc:
            self._fail(str(exc))
            return b""
        rest = data[end + 4 :]
        if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            return self._parse_head(response, rest) if rest else b""
        response.status, response.headers = status, CIMultiDictProxy(headers)
        try:
            self._framing, self._remaining = framing(status, headers, self._head_only)
        except ValueError as exc:
            self._fail(str(exc))
            return b""
        self._chunked = ChunkedDecoder() if self._framing == CHUNKED else None
        connection = headers.get("Connection", "").lower()
        if version_minor == b"0":
            self.keep_alive = "keep-alive" in connection and self._framing != UNTIL_CLOSE
        else:
            self.keep_alive = "close" not in connection and self._framing != UNTIL_CLOSE
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._framing == NONE or (self._framing == LENGTH and self._remaining == 0):
            response.finish()
        return rest

    def _feed(self, response: Response, data: bytes) -> None:
        framing = self._framing
        if framing == LENGTH:
            size = len(data)
            if size <= self._remaining:
                self._remaining -= size
                response.deliver(data)
            else:  # more than the answer declared: keep its body, drop the connection
                response.deliver(data[: self._remaining])
                self._remaining = 0
                self.keep_alive = False
            if self._remaining == 0:
                response.finish()
        elif framing == CHUNKED:
            decoder = self._chunked
            assert decoder is not None
            try:
                parts = decoder.feed(data)
            except ValueError as exc:
                self._fail(str(exc))
                return
            for part in parts:
                response.deliver(part)
            if decoder.done:
                self.keep_alive = self.keep_alive and not decoder.extra
                response.finish()
        elif framing == UNTIL_CLOSE:
            response.deliver(data)
        else:
            self.keep_alive = False  # a body where none was due

    def _fail(self, detail: str, kind: str = "bad_response") -> None:
        error = UpstreamFailure(kind, detail)
        self.keep_alive = False
        self._fail_head(error)
        response = self._response
        if response is not None:
            response.fail(error)
        self.abort()

    def _fail_head(self, error: Exception) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)


def _reason(exc: Exception | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "EOF"
