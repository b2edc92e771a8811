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
        text = _last_user_text(data.get("messages") or [])
        words = text.split() or ["(empty)"]
        usage = {
            "prompt_tokens": max(1, len(body) // 4),
            "completion_tokens": len(words),
            "total_tokens": max(1, len(body) // 4) + len(words),
        }
        model = str(data.get("model"))
        if data.get("stream") is True:
            options = data.get("stream_options")
            with_usage = type(options) is dict and options.get("include_usage") is True
            chunks = _stream_chunks(model, words, usage if with_usage else None)
            return MockExchange(chunks=chunks, stream=True, delay_s=self._delay_s)
        answer = _completion(model, " ".join(words), usage)
        return MockExchange(chunks=[answer], stream=False, delay_s=0)

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


def _completion(model: str, text: str, usage: dict[str, int]) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


def _stream_chunks(model: str, words: list[str], usage: dict[str, int] | None) -> list[bytes]:
    created = int(time.time())

    def event(delta: dict[str, str], finish: str | None, extra: dict[str, Any]) -> bytes:
        chunk = {
            "id": "chatcmpl-mock",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    tail = {"usage": None} if usage else {}
    chunks = [event({"role": "assistant", "content": ""}, None, tail)]
    chunks += [event({"content": (" " if i else "") + w}, None, tail) for i, w in enumerate(words)]
    chunks.append(event({}, "stop", tail))
    if usage:
        chunks.append(
            b"data: "
            + orjson.dumps(
                {
                    "id": "chatcmpl-mock",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
            + b"\n\n"
        )
    chunks.append(b"data: [DONE]\n\n")
    return chunks
