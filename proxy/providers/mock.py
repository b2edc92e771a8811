"""The `mock` provider: answers inside the gateway, no network, for demos and load benchmarks.

Echoes the last user message, streams it word by word, and reports usage (prompt tokens
estimated at four bytes a token, completion tokens = words). `MockTransport` carries requests in
process and answers in the wire format of the protocol it imitates (`imitate: openai` or
`anthropic`), so the same provider code as for a real upstream reads and converts the answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..config import AccountConfig, ProviderConfig

_HEADERS_JSON = {"Content-Type": "application/json"}
_HEADERS_SSE = {"Content-Type": "text/event-stream"}


class MockExchange:
    __slots__ = ("status", "headers", "_chunks", "_delay_s", "_started")

    def __init__(self, *, chunks: list[bytes], stream: bool, delay_s: float) -> None:
        self.status = 200
        self.headers = _HEADERS_SSE if stream else _HEADERS_JSON
        self._chunks = chunks[::-1]  # popped from the end
        self._delay_s = delay_s
        self._started = False

    async def read(self) -> bytes:
        if self._started and self._delay_s and self._chunks:
            await asyncio.sleep(self._delay_s)
        self._started = True
        return self._chunks.pop() if self._chunks else b""

    @property
    def finished(self) -> bool:
        return not self._chunks

    def close(self) -> None:
        self._chunks = []


class Reply:
    """What the mock answers: the last user message's words, at most `max_tokens` of them (then
    `finish_reason: length`), as each of `n` choices."""

    __slots__ = ("model", "words", "truncated", "n", "prompt_tokens", "completion_tokens", "stream", "usage_asked")

    def __init__(self, data: dict[str, Any], body_size: int) -> None:
        words = _last_user_text(data.get("messages") or []).split() or ["(empty)"]
        cap = data.get("max_completion_tokens") or data.get("max_tokens")
        self.truncated = type(cap) is int and 0 < cap < len(words)
        self.words = words[:cap] if self.truncated and type(cap) is int else words
        n = data.get("n")
        self.n = n if type(n) is int and n > 0 else 1
        self.model = str(data.get("model"))
        self.prompt_tokens = max(1, body_size // 4)
        self.completion_tokens = len(self.words) * self.n
        self.stream = data.get("stream") is True
        options = data.get("stream_options")
        self.usage_asked = type(options) is dict and options.get("include_usage") is True


# A protocol's rendering of a reply: the chunks of the answer's body.
Render = Callable[[Reply], list[bytes]]


class MockTransport:
    """Carries requests in process: the answer is `render`ed from the request body."""

    def __init__(self, config: ProviderConfig, render: Render) -> None:
        self._render = render
        self._latency_s = config.latency_ms / 1000
        self._delay_s = config.chunk_delay_ms / 1000

    def target(self, path: str) -> bytes:
        return path.encode()

    async def post(
        self, account: AccountConfig, target: bytes, body: bytes, request_id: str, headers: bytes = b""
    ) -> MockExchange:
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        if target.endswith(b"/count_tokens"):  # Anthropic's count_tokens: the prompt estimate
            count = {"input_tokens": max(1, len(body) // 4)}
            return MockExchange(chunks=[orjson.dumps(count)], stream=False, delay_s=0)
        reply = Reply(orjson.loads(body), len(body))
        chunks = self._render(reply)
        return MockExchange(chunks=chunks, stream=reply.stream, delay_s=self._delay_s if reply.stream else 0)

    async def probe(self, account: AccountConfig) -> bool:
        return True

    async def close(self) -> None:
        return None


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if type(message) is dict and message.get("role") == "user":
            content = message.get("content")
            if type(content) is str:
                return content
            if type(content) is list:
                return " ".join(
                    part.get("text", "") for part in content if type(part) is dict
                )
    return ""


def render_openai(reply: Reply) -> list[bytes]:
    """A `chat.completion`, or its stream with the usage chunk when the request asked for it."""
    usage = {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }
    finish = "length" if reply.truncated else "stop"
    if not reply.stream:
        message = {"role": "assistant", "content": " ".join(reply.words)}
        choices = [{"index": i, "message": message, "finish_reason": finish} for i in range(reply.n)]
        return [orjson.dumps({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": int(time.time()),
            "model": reply.model, "choices": choices, "usage": usage,
        })]
    head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": int(time.time()), "model": reply.model}
    tail = {"usage": None} if reply.usage_asked else {}

    def each(delta: dict[str, str], finish_reason: str | None) -> bytes:
        choices = [{"index": i, "delta": delta, "finish_reason": finish_reason} for i in range(reply.n)]
        return _data({**head, "choices": choices, **tail})

    chunks = [each({"role": "assistant", "content": ""}, None)]
    chunks += [each({"content": (" " if i else "") + w}, None) for i, w in enumerate(reply.words)]
    chunks.append(each({}, finish))
    if reply.usage_asked:
        chunks.append(_data({**head, "choices": [], "usage": usage}))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


def render_anthropic(reply: Reply) -> list[bytes]:
    """A Messages API `message`, or its stream of named events, as Anthropic sends them."""
    stop = "max_tokens" if reply.truncated else "end_turn"
    if not reply.stream:
        return [orjson.dumps({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": reply.model,
            "content": [{"type": "text", "text": " ".join(reply.words)}],
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
        })]
    start: dict[str, Any] = {
        "id": "msg_mock", "type": "message", "role": "assistant", "model": reply.model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1},
    }
    chunks = [
        _event("message_start", {"type": "message_start", "message": start}),
        _event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    chunks += [
        _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "text_delta", "text": (" " if i else "") + w}})
        for i, w in enumerate(reply.words)
    ]
    chunks += [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                                 "usage": {"output_tokens": reply.completion_tokens}}),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return chunks


def _data(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _event(name: str, payload: object) -> bytes:
    return b"event: " + name.encode() + b"\n" + _data(payload)
