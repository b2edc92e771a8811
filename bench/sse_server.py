"""A streaming upstream that is never the bottleneck: any POST gets an SSE chat completion.

The path sets the shape: `/sse/{chunks}/{gap_ms}/...` sends `chunks` content events `gap_ms`
apart, then a usage chunk when the body asked for `stream_options.include_usage`, then
`data: [DONE]`. A plain asyncio protocol on uvloop: HTTP/1.1 keep-alive, chunked encoding.

    python -m bench.sse_server --port 9000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import re

import orjson
import uvloop

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
SHAPE = re.compile(r"^/sse/(\d+)/(\d+)(?:/|$)")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(choices: list[dict[str, object]], **extra: object) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-stream",
        "choices": choices,
        **extra,
    }
    return _chunked(b"data: " + orjson.dumps(chunk) + b"\n\n")


@functools.lru_cache(maxsize=64)
def events(chunks: int) -> tuple[bytes, ...]:
    """The content events, already chunk-encoded; the last one carries finish_reason."""
    return tuple(
        _event([{"index": 0, "delta": {"content": f"tok{i} "},
                 "finish_reason": "stop" if i == chunks - 1 else None}])
        for i in range(chunks)
    )


def ending(chunks: int, with_usage: bool) -> bytes:
    usage = {"prompt_tokens": 250, "completion_tokens": chunks, "total_tokens": 250 + chunks}
    tail = _event([], usage=usage) if with_usage else b""
    return tail + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class SseProtocol(asyncio.Protocol):
    """One connection: reads a request (head and Content-Length body), streams the answer."""

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.buffer = bytearray()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self.next_request()

    def next_request(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        length = CONTENT_LENGTH.search(head)
        total = end + 4 + (int(length[1]) if length else 0)
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        path = head.split(b" ", 2)[1].decode("latin-1")
        self.busy = True
        asyncio.get_running_loop().create_task(self.answer(path, body))

    async def answer(self, path: str, body: bytes) -> None:
        shape = SHAPE.match(path)
        chunks, gap_s = (int(shape[1]), int(shape[2]) / 1000) if shape else (20, 0.0)
        options = orjson.loads(body).get("stream_options") if body else None
        with_usage = isinstance(options, dict) and options.get("include_usage") is True
        content = events(max(chunks, 1))
        if gap_s == 0:
            self.write(HEAD + b"".join(content) + ending(chunks, with_usage))
        else:
            self.write(HEAD + content[0])
            for event in content[1:]:
                await asyncio.sleep(gap_s)
                if self.transport is None:
                    return
                self.write(event)
            self.write(ending(chunks, with_usage))
        self.busy = False
        if self.buffer:
            self.next_request()

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(SseProtocol, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
