"""A lean HTTP/1.1 client for upstream calls: pooled keep-alive connections, bodies as they come.

aiohttp's client spends about two thirds of a bare pass-through's CPU on each request (request
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
from collections import deque
from typing import cast
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEAD = 64 * 1024  # status line and header fields
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
HIGH_WATER = 256 * 1024  # unread body bytes at which the socket is paused ...
LOW_WATER = 64 * 1024  # ... and at or under which it reads again
SPLIT_WRITE = 64 * 1024  # bodies from this size are written after the head, not copied onto it

# Body framing of a response
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)
# Where a chunked body is
SIZE, DATA, DATA_END, TRAILER, DONE = range(5)


class UpstreamFailure(Exception):
    """An attempt that got no usable answer: `kind` is `connect` or `bad_response`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


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
        try:
            return await conn.exchange(head, body, method == b"HEAD")
        except _Stale:
            raise UpstreamFailure("bad_response", "connection closed before an answer") from None

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


class Response:
    """One answer being read: `status` and `headers` first, then the body chunk by chunk."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_size", "_done", "_error", "_waiter", "_closed")

    def __init__(self, conn: Connection) -> None:
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0  # bytes in _chunks
        self._done = False  # the whole body has arrived
        self._error: UpstreamFailure | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    async def read(self) -> bytes:
        """The body received since the last read, waiting for some; b"" at the end."""
        while True:
            if self._chunks:
                chunks = self._chunks
                data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._size = 0
                self._conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def finished(self) -> bool:
        """Whether the whole body has been read."""
        return self._done and not self._chunks and self._error is None

    @property
    def buffered(self) -> int:
        """Body bytes received and not read yet."""
        return self._size

    def close(self) -> None:
        """Done with this answer: its connection is pooled when the body ended cleanly and the
        upstream keeps it alive, else aborted (an unfinished request must not go on upstream)."""
        if self._closed:
            return
        self._closed = True
        self._conn.release(self)

    # called by the connection

    def _deliver(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _fail(self, error: UpstreamFailure) -> None:
        if not self._done:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


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
        self._remaining = 0  # LENGTH: body bytes to come; CHUNKED: of the current chunk
        self._chunk_state = SIZE
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
            raise UpstreamFailure("bad_response", "connection closed before the request")
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
        if response._done and response._error is None and self.keep_alive and not self._rest:
            self.reused = True
            self.resume()
            self.pool._release(self)
        else:
            self.abort()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            response = self._response
            if response is None or response._size <= LOW_WATER:
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
                self._fail(f"connection closed before the answer's head ({_reason(exc)})")
        elif self._framing == UNTIL_CLOSE:
            self.keep_alive = False
            response._finish()
        elif not response._done:
            self._fail(f"body cut: connection closed ({_reason(exc)})")

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or response._done:
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
        if response._size > HIGH_WATER and not self._paused and self.transport is not None:
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
        self._chunk_state = SIZE
        connection = headers.get("Connection", "").lower()
        if version_minor == b"0":
            self.keep_alive = "keep-alive" in connection and self._framing != UNTIL_CLOSE
        else:
            self.keep_alive = "close" not in connection and self._framing != UNTIL_CLOSE
        if self._head is not None and not self._head.done():
            self._head.set_result(None)
        if self._framing == NONE or (self._framing == LENGTH and self._remaining == 0):
            response._finish()
        return rest

    def _feed(self, response: Response, data: bytes) -> None:
        framing = self._framing
        if framing == LENGTH:
            size = len(data)
            if size <= self._remaining:
                self._remaining -= size
                response._deliver(data)
            else:  # more than the answer declared: keep its body, drop the connection
                response._deliver(data[: self._remaining])
                self._remaining = 0
                self.keep_alive = False
            if self._remaining == 0:
                response._finish()
        elif framing == CHUNKED:
            self._feed_chunked(response, data)
        elif framing == UNTIL_CLOSE:
            response._deliver(data)
        else:
            self.keep_alive = False  # a body where none was due

    def _feed_chunked(self, response: Response, data: bytes) -> None:
        pos, end = 0, len(data)
        state = self._chunk_state
        while pos < end:
            if state == DATA:
                take = min(self._remaining, end - pos)
                response._deliver(data if take == end else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = DATA_END
            elif state == DATA_END:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    self._fail("chunk not followed by CRLF")
                    return
                pos += 2
                state = SIZE
            elif state == DONE:
                self.keep_alive = False  # bytes after the last chunk
                break
            else:  # SIZE or TRAILER: a line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        self._fail("chunk-size line too long")
                        return
                    break
                line = data[pos:eol]
                pos = eol + 2
                if state == TRAILER:
                    if not line:
                        state = DONE
                        response._finish()
                    continue
                size = chunk_size(line)
                if size < 0:
                    self._fail(f"bad chunk-size line {line[:40]!r}")
                    return
                if size == 0:
                    state = TRAILER
                else:
                    state, self._remaining = DATA, size
        self._chunk_state = state
        if pos < end and state != DONE:
            self._rest = data[pos:]

    def _fail(self, detail: str) -> None:
        error = UpstreamFailure("bad_response", detail)
        self.keep_alive = False
        self._fail_head(error)
        response = self._response
        if response is not None:
            response._fail(error)
        self.abort()

    def _fail_head(self, error: Exception) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)


def parse_head(head: bytes) -> tuple[int, bytes, CIMultiDict[str]]:
    """(status, HTTP minor version, header fields) of an answer's head, without its final CRLFs."""
    lines = head.split(b"\r\n")
    line = lines[0]
    if (
        len(line) < 12
        or not line.startswith(b"HTTP/1.")
        or line[8:9] != b" "
        or not line[9:12].isdigit()
        or line[12:13] not in (b"", b" ")
    ):
        raise ValueError(f"bad status line {line[:60]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for field in lines[1:]:
        name, colon, value = field.partition(b":")
        if not colon or not name or name[-1:] in (b" ", b"\t") or field[:1] in (b" ", b"\t"):
            raise ValueError(f"bad header field {field[:60]!r}")
        headers.add(name.decode("latin-1"), value.strip(b" \t").decode("latin-1"))
    return int(line[9:12]), line[7:8], headers


def framing(status: int, headers: CIMultiDict[str], head_only: bool) -> tuple[int, int]:
    """How the body of an answer is delimited (RFC 9112 §6.3): (framing, Content-Length)."""
    if head_only or status in (204, 304):
        return NONE, 0
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        return (CHUNKED if coding.rpartition(",")[2].strip().lower() == "chunked" else UNTIL_CLOSE), 0
    lengths = headers.getall("Content-Length", ())
    if not lengths:
        return UNTIL_CLOSE, 0
    values = {value.strip() for length in lengths for value in length.split(",")}
    value = values.pop()
    if values or not value.isdigit():
        raise ValueError(f"bad Content-Length {lengths!r}")
    return LENGTH, int(value)


_HEX = frozenset(b"0123456789abcdefABCDEF")


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line gives (extensions ignored); -1 when it is not one."""
    digits = line.partition(b";")[0].rstrip(b" \t")
    if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
        return -1
    return int(digits, 16)


def _reason(exc: Exception | None) -> str:
    return f"{type(exc).__name__}: {exc}" if exc is not None else "EOF"
