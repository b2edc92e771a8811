"""An OpenAI-compatible upstream that misbehaves on purpose, one way per account key.

The account's key names the fault: `Authorization: Bearer sk-<mode>` (anything after a `.` is
ignored, so `sk-reset.2` is a second account with the same fault). Each mode answers JSON and
streamed requests in its own way (`MODES`); `ok` answers both correctly. Written on raw sockets,
not aiohttp, so that it can send what no well-behaved server would: cut heads, bad chunks, resets.
Used by the fault-matrix tests (in process) and by the soak (`python -m bench.soak`, as a process:
`python -m bench.faultupstream PORT`).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
from collections import Counter

import orjson
import uvloop

WORDS = ("one", "two", "three", "four", "five")
USAGE = {"prompt_tokens": 7, "completion_tokens": len(WORDS), "total_tokens": 7 + len(WORDS)}
SLOW_GAP_S = 0.02
# Between the pieces of a broken answer, so that what came before the break is read on its own.
PIECE_GAP_S = 0.01

# What each mode does to a JSON request / a streamed one (the tests' expectations read this).
MODES = {
    "ok": ("a chat.completion", "a complete stream with [DONE]"),
    "slow": ("a chat.completion after a pause", f"a complete stream, events {SLOW_GAP_S}s apart"),
    "reset": ("the connection closed unanswered", "the same"),
    "rst": ("a TCP reset, unanswered", "the same"),
    "garbage": ("a head that is not HTTP", "the same"),
    "cut_head": ("half a head, then closed", "the same"),
    "cut_body": ("half a body, then closed", "two events, then closed"),
    "not_object": ("a JSON array", "complete events, a clean end without [DONE]"),
    "bad_chunk": ("a broken chunked body", "one event, then a broken chunk"),
    "hang": ("nothing, ever", "the same"),
    "stall": ("a head, then nothing", "a head and one event, then nothing"),
    "s400": ("400 invalid_request_error", "the same"),
    "s401": ("401", "the same"),
    "s429": ("429 with retry-after: 1", "the same"),
    "s500": ("500", "the same"),
    "s529": ("529 overloaded_error", "the same"),
}


def completion() -> bytes:
    return orjson.dumps({
        "id": "chatcmpl-fault", "object": "chat.completion", "created": 1700000000, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(WORDS)},
                     "finish_reason": "stop"}],
        "usage": USAGE,
    })


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chunk(text: str | None, *, finish: str | None = None, usage: object = None) -> bytes:
    choices = [] if text is None and finish is None else [
        {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish}
    ]
    payload: dict[str, object] = {
        "id": "chatcmpl-fault", "object": "chat.completion.chunk", "created": 1700000000,
        "model": "m", "choices": choices,
    }
    if usage is not None:
        payload["usage"] = usage
    return event(payload)


def stream_events(include_usage: bool) -> list[bytes]:
    events = [chunk(word + " ") for word in WORDS] + [chunk(None, finish="stop")]
    if include_usage:
        events.append(chunk(None, usage=USAGE))
    return events + [b"data: [DONE]\n\n"]


def head(status: int, *, length: int | None = None, sse: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    kind = b"text/event-stream" if sse else b"application/json"
    return b"HTTP/1.1 %d X\r\nContent-Type: %s\r\n%s\r\n\r\n" % (status, kind, framing)


def framed(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


ERRORS = {
    "s400": (400, b'{"error": {"message": "bad request", "type": "invalid_request_error", "param": null, "code": null}}'),
    "s401": (401, b'{"error": {"message": "bad key", "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}}'),
    "s429": (429, b'{"error": {"message": "slow down", "type": "requests", "param": null, "code": null}}'),
    "s500": (500, b'{"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}'),
    "s529": (529, b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'),
}


class FaultUpstream:
    """The server; `requests` counts requests per mode, `open` the connections now open."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self._writers.add(writer)
        try:
            while await self._answer_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.transport.abort()

    async def _answer_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Reads one request and answers it; whether the connection stays open for another."""
        try:
            request_head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        mode, length = "ok", 0
        for line in request_head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            elif name.lower() == b"authorization":
                mode = value.strip().removeprefix(b"Bearer sk-").partition(b".")[0].decode()
        body = orjson.loads(await reader.readexactly(length)) if length else {}
        self.requests[mode] += 1
        stream = body.get("stream") is True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await answer(mode, stream, include_usage, reader, writer)


async def answer(
    mode: str, stream: bool, include_usage: bool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    """Writes `mode`'s answer; whether the connection may serve another request."""
    if mode in ("ok", "slow"):
        await _answer_ok(writer, stream, include_usage, SLOW_GAP_S if mode == "slow" else 0.0)
        return True
    if mode in ERRORS:
        status, payload = ERRORS[mode]
        extra = b"retry-after: 1\r\n" if status == 429 else b""
        writer.write(head(status, length=len(payload)).replace(b"\r\n\r\n", b"\r\n" + extra + b"\r\n", 1) + payload)
        return True
    if mode == "rst":
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False
    if mode in ("hang", "stall"):
        if mode == "stall":
            writer.write(head(200, sse=stream) + (framed(chunk("one ")) if stream else b""))
        await writer.drain()
        await reader.read()  # until the gateway gives up and closes the connection
        return False
    for i, piece in enumerate(_broken(mode, stream, include_usage)):
        if i:
            await asyncio.sleep(PIECE_GAP_S)
        writer.write(piece)
        await writer.drain()
    return False


def _broken(mode: str, stream: bool, include_usage: bool) -> list[bytes]:
    """The pieces (written a moment apart) of a mode that ends by closing the connection."""
    events = stream_events(include_usage)
    if mode == "garbage":
        return [b"HTTP/9 what\r\n\r\n"]
    if mode == "cut_head":
        return [b"HTTP/1.1 200 OK\r\nContent-"]
    if mode == "cut_body":
        if stream:
            return [head(200, sse=True) + framed(events[0]), framed(events[1])]
        return [head(200, length=200), completion()[:20]]
    if mode == "not_object":
        if stream:
            return [head(200, sse=True) + framed(events[0]), b"".join(framed(e) for e in events[1:-1]) + b"0\r\n\r\n"]
        return [head(200, length=3) + b"[1]"]
    if mode == "bad_chunk":
        return [head(200, sse=stream) + (framed(events[0]) if stream else b""), b"zz\r\nhello\r\n"]
    return []  # reset: closed unanswered


async def _answer_ok(writer: asyncio.StreamWriter, stream: bool, include_usage: bool, gap_s: float) -> None:
    if not stream:
        if gap_s:
            await asyncio.sleep(gap_s * len(WORDS))
        payload = completion()
        writer.write(head(200, length=len(payload)) + payload)
        return
    writer.write(head(200, sse=True))
    for item in stream_events(include_usage):
        writer.write(framed(item))
        if gap_s:
            await writer.drain()
            await asyncio.sleep(gap_s)
    writer.write(b"0\r\n\r\n")


async def _main(port: int) -> None:
    server = FaultUpstream()
    await server.start(port)
    print(f"fault upstream on {server.url}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(_main(int(sys.argv[1])))
