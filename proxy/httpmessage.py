"""An HTTP/1.1 answer: parsed from bytes (head, body framing, chunked decoding), read as `Response`.

The parsing is pure functions and one incremental decoder, fed by `http1`'s connection with what
the socket gives; malformed input raises ValueError saying what was wrong. `Response` is the
reader's side of one answer: the chunks received and a wake-up when more come.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

LOW_WATER = 64 * 1024  # unread body bytes at or under which a paused socket reads again
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or a trailer field

# Body framing of an answer (RFC 9112 §6.3)
NONE, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)
# Where a chunked body is
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)
_HEX = frozenset(b"0123456789abcdefABCDEF")


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
    """How the body of an answer is delimited: (framing, Content-Length)."""
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


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line gives (extensions ignored); -1 when it is not one."""
    digits = line.partition(b";")[0].rstrip(b" \t")
    if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
        return -1
    return int(digits, 16)


class ChunkedDecoder:
    """A chunked body (RFC 9112 §7.1) decoded as its bytes arrive, split anywhere; chunk
    extensions and trailer fields are read past."""

    __slots__ = ("done", "extra", "_state", "_remaining", "_rest")

    def __init__(self) -> None:
        self.done = False  # the last chunk and the trailer section have arrived
        self.extra = False  # bytes followed them
        self._state = _SIZE
        self._remaining = 0  # bytes of the current chunk still to come
        self._rest = b""  # an incomplete line or chunk end, kept for the next feed

    def feed(self, data: bytes) -> list[bytes]:
        """The body bytes `data` carries (without its framing)."""
        if self._rest:
            data, self._rest = self._rest + data, b""
        parts: list[bytes] = []
        pos, end = 0, len(data)
        state = self._state
        while pos < end:
            if state == _DATA:
                take = min(self._remaining, end - pos)
                parts.append(data if take == end else data[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    state = _DATA_END
            elif state == _DATA_END:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise ValueError("chunk not followed by CRLF")
                pos += 2
                state = _SIZE
            elif state == _DONE:
                self.extra = True
                pos = end
            else:  # _SIZE or _TRAILER: a line
                eol = data.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        raise ValueError("chunk-size or trailer line too long")
                    break
                line = data[pos:eol]
                pos = eol + 2
                if state == _TRAILER:
                    if not line:
                        state = _DONE
                        self.done = True
                    continue
                size = chunk_size(line)
                if size < 0:
                    raise ValueError(f"bad chunk-size line {line[:40]!r}")
                if size == 0:
                    state = _TRAILER
                else:
                    state, self._remaining = _DATA, size
        self._state = state
        if pos < end:
            self._rest = data[pos:]
        return parts


class UpstreamFailure(Exception):
    """An attempt that got no usable answer. `kind`: `connect` (refused, DNS, TLS, connect
    timeout), `reset` (the connection closed before any byte of an answer) or `bad_response`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class Owner(Protocol):
    """What delivers an answer: told when the reader has caught up, and when it is done."""

    def resume(self) -> None: ...

    def release(self, response: Response) -> None: ...


class Response:
    """One answer being read: `status` and `headers` first, then the body chunk by chunk."""

    __slots__ = ("status", "headers", "_conn", "_chunks", "_size", "done", "error", "_waiter", "_closed")

    def __init__(self, conn: Owner) -> None:
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._size = 0  # bytes in _chunks
        self.done = False  # the whole body has arrived
        self.error: UpstreamFailure | None = None
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
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @property
    def finished(self) -> bool:
        """Whether the whole body has been read."""
        return self.done and not self._chunks and self.error is None

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

    # called by the connection that receives it

    def deliver(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self._wake()

    def finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, error: UpstreamFailure) -> None:
        if not self.done:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
