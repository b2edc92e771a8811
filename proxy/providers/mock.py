"""The `mock` provider: answers inside the gateway, no network, for demos and load benchmarks.

Echoes the last user message, streams it word by word, and reports usage (prompt tokens
estimated at four bytes a token, completion tokens = words). Speaks the same `Exchange`
interface as a real upstream, so everything around it runs as in production.
"""

from __future__ import annotations

import asyncio
import time
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


class MockProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._latency_s = config.latency_ms / 1000
        self._delay_s = config.chunk_delay_ms / 1000

    async def send(
        self, account: AccountConfig, body: bytes, data: dict[str, Any], request_id: str
    ) -> MockExchange:
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        reply = Reply.of(data, len(body))
        model = str(data.get("model"))
        if data.get("stream") is True:
            options = data.get("stream_options")
            with_usage = type(options) is dict and options.get("include_usage") is True
            chunks = _stream_chunks(model, reply, with_usage)
            return MockExchange(chunks=chunks, stream=True, delay_s=self._delay_s)
        return MockExchange(chunks=[_completion(model, reply)], stream=False, delay_s=0)

    async def probe(self, account: AccountConfig) -> bool:
        return True

    async def close(self) -> None:
        return None


class Reply:
    """What the mock answers: the last user message's words, at most `max_tokens` of them (then
    `finish_reason: length`), as each of `n` choices."""

    __slots__ = ("words", "finish", "n", "usage")

    def __init__(self, words: list[str], finish: str, n: int, prompt_tokens: int) -> None:
        self.words, self.finish, self.n = words, finish, n
        completion = len(words) * n
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }

    @classmethod
    def of(cls, data: dict[str, Any], body_size: int) -> Reply:
        words = _last_user_text(data.get("messages") or []).split() or ["(empty)"]
        cap = data.get("max_completion_tokens") or data.get("max_tokens")
        finish = "stop"
        if type(cap) is int and 0 < cap < len(words):
            words, finish = words[:cap], "length"
        n = data.get("n")
        return cls(words, finish, n if type(n) is int and n > 0 else 1, max(1, body_size // 4))


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


def _completion(model: str, reply: Reply) -> bytes:
    text = " ".join(reply.words)
    return orjson.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reply.finish}
                for i in range(reply.n)
            ],
            "usage": reply.usage,
        }
    )


def _stream_chunks(model: str, reply: Reply, with_usage: bool) -> list[bytes]:
    created = int(time.time())
    tail = {"usage": None} if with_usage else {}

    def event(choices: list[dict[str, Any]], extra: dict[str, Any]) -> bytes:
        chunk = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def each(delta: dict[str, str], finish: str | None) -> bytes:
        return event([{"index": i, "delta": delta, "finish_reason": finish} for i in range(reply.n)], tail)

    chunks = [each({"role": "assistant", "content": ""}, None)]
    chunks += [each({"content": (" " if i else "") + w}, None) for i, w in enumerate(reply.words)]
    chunks.append(each({}, reply.finish))
    if with_usage:
        chunks.append(event([], {"usage": reply.usage}))
    chunks.append(b"data: [DONE]\n\n")
    return chunks
