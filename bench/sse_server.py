"""A streaming upstream that is never the bottleneck: any POST gets an SSE chat completion.

The path sets the shape: `/sse/{chunks}/{gap_ms}/...` sends `chunks` content events `gap_ms`
apart, then a usage chunk when the body asked for `stream_options.include_usage`, then
`data: [DONE]`. `/anthropic/{chunks}/{gap_ms}/...` sends the same answer as Anthropic's Messages
API streams it: message_start, content_block_start, `chunks` text deltas `gap_ms` apart,
content_block_stop, message_delta with the usage, message_stop. A plain asyncio protocol on
uvloop: HTTP/1.1 keep-alive, chunked encoding.

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
SHAPE = re.compile(r"^/(sse|anthropic)/(\d+)/(\d+)(?:/|$)")
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
STREAM_PROMPT_TOKENS = 250  # every stream's usage: these prompt tokens, one completion token a chunk


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(choices: list[dict[str, object]], **extra: object) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-stream",
        "choices": choices,
        **extra,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def openai_events(chunks: int, with_usage: bool) -> tuple[bytes, ...]:
    """The SSE events of a chat completion stream: `chunks` content events (the last one carries
    finish_reason), the usage chunk when asked for, [DONE]."""
    content = [_chunk([{"index": 0, "delta": {"content": f"tok{i} "},
                        "finish_reason": "stop" if i == chunks - 1 else None}]) for i in range(chunks)]
    usage = {"prompt_tokens": STREAM_PROMPT_TOKENS, "completion_tokens": chunks,
             "total_tokens": STREAM_PROMPT_TOKENS + chunks}
    return (*content, *([_chunk([], usage=usage)] if with_usage else []), b"data: [DONE]\n\n")


def _named(name: str, payload: dict[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def anthropic_events(chunks: int) -> tuple[bytes, ...]:
    """The same answer as Anthropic streams it: two opening events, `chunks` text deltas, three
    closing events (the usage in message_start and message_delta)."""
    message: dict[str, object] = {"id": "msg_bench", "type": "message", "role": "assistant", "model": "bench-anthropic",
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": STREAM_PROMPT_TOKENS, "cache_creation_input_tokens": 0,
                         "cache_read_input_tokens": 0, "output_tokens": 1}}
    deltas = [_named("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": f"tok{i} "}})
              for i in range(chunks)]
    return (
        _named("message_start", {"type": "message_start", "message": message}),
        _named("content_block_start", {"type": "content_block_start", "index": 0,
                                       "content_block": {"type": "text", "text": ""}}),
        *deltas,
        _named("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _named("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                 "usage": {"output_tokens": chunks}}),
        _named("message_stop", {"type": "message_stop"}),
    )


def _parts(events: tuple[bytes, ...], *, lead: int, tail: int) -> tuple[bytes, ...]:
    """`events` chunk-encoded and cut where the gaps go: the `lead` opening events come with the
    first content event, the `tail` closing ones (and the end of the body) with the last."""
    chunked = [_chunked(event) for event in events]
    content = chunked[lead : len(chunked) - tail]
    content[0] = b"".join(chunked[:lead]) + content[0]
    content[-1] += b"".join(chunked[len(chunked) - tail :]) + b"0\r\n\r\n"
    return tuple(content)


@functools.lru_cache(maxsize=128)
def openai_parts(chunks: int, with_usage: bool) -> tuple[bytes, ...]:
    return _parts(openai_events(chunks, with_usage), lead=0, tail=2 if with_usage else 1)


@functools.lru_cache(maxsize=64)
def anthropic_parts(chunks: int) -> tuple[bytes, ...]:
    return _parts(anthropic_events(chunks), lead=2, tail=3)


def stream_parts(path: str, body: bytes) -> tuple[tuple[bytes, ...], float]:
    """What to send for a request on `path`, in parts to be written `gap_s` apart."""
    shape = SHAPE.match(path)
    kind, chunks, gap_s = (shape[1], int(shape[2]), int(shape[3]) / 1000) if shape else ("sse", 20, 0.0)
    chunks = max(chunks, 1)
    if kind == "anthropic":
        return anthropic_parts(chunks), gap_s
    options = orjson.loads(body).get("stream_options") if body else None
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    return openai_parts(chunks, with_usage), gap_s


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
        parts, gap_s = stream_parts(path, body)
        if gap_s == 0:
            self.write(HEAD + b"".join(parts))
        else:
            self.write(HEAD + parts[0])
            for part in parts[1:]:
                await asyncio.sleep(gap_s)
                if self.transport is None:
                    return
                self.write(part)
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
