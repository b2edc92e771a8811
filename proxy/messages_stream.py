"""OpenAI `chat.completion.chunk` SSE → Anthropic Messages events (reference §7.6), fed raw bytes.

Owns the event sequence a `/v1/messages` client sees of a converted stream: every event with its
`event:` line, one open block at a time, parallel tool calls each in their own block (B27), and the
terminal message_delta + message_stop. Same interface as `streaming.SseScanner`, whose framing
and usage capture it reuses. Pure: no I/O, no clock; linear in the bytes fed.
"""

from __future__ import annotations

from typing import Any, Mapping

import orjson

from .messages_answer import anthropic_usage, message_id, stop_reason, tool_use_id
from .streaming import SseScanner


class MessagesStreamError(Exception):
    """An in-band `data: {"error": …}` from the upstream: classify it like an error answer."""

    def __init__(self, error: Any) -> None:
        self.error = error if type(error) is dict else {}
        message = self.error.get("message")
        super().__init__(message if type(message) is str else "upstream stream error")


def sse(kind: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def error_event(error_type: str, message: str) -> bytes:
    """The end of a stream that failed after it started: no message_stop follows (reference §7.2)."""
    return sse("error", {"type": "error", "error": {"type": error_type, "message": message}})


class _Tool:
    __slots__ = ("id", "name", "parts", "block", "sent")

    def __init__(self) -> None:
        self.id: Any = None
        self.name = ""
        self.parts: list[str] = []  # argument fragments not yet sent
        self.block: int | None = None  # its content block once announced
        self.sent = False  # some argument bytes went out: "{}" is no longer owed


class MessagesStream:
    """Converts one upstream stream. `feed` returns the client's bytes to send now; nothing until
    the first content block (message_start is held), so an error before it leaves the client
    untouched and the request may fail over. ValueError for a malformed chunk or an end without
    a finish_reason; MessagesStreamError for an in-band error. The output of a feed that raises
    is never the client's."""

    __slots__ = (
        "model", "tool_names", "input_tokens", "done", "committed", "_scanner", "_held", "_blocks",
        "_open", "_open_tool", "_tools", "_late", "_finish", "_id", "_reported",
    )

    def __init__(self, *, model: str, tool_names: Mapping[str, str], input_tokens: int) -> None:
        self.model = model  # the client's requested name
        self.tool_names = tool_names
        self.input_tokens = input_tokens  # the pre-dispatch estimate message_start carries
        self.done = False
        self.committed = False
        self._scanner = SseScanner(strip_usage=False)
        self._reported: dict[str, Any] | None = None
        self._held = b""  # message_start, until the first block
        self._blocks = 0  # blocks started: the next one's index
        self._open: str | None = None  # the open block's kind: text, thinking or tool_use
        self._open_tool: int | None = None  # the OpenAI index of the open tool block
        self._tools: dict[int, _Tool] = {}
        self._late: list[tuple[str, str]] = []  # (kind, text) arriving while a tool block is open
        self._finish: Any = None
        self._id = ""

    @property
    def usage(self) -> dict[str, Any] | None:
        """OpenAI-shaped, from the include_usage chunk (or as `take_usage` was told it): what
        settlement reads and message_delta carries."""
        return self._reported if self._reported is not None else self._scanner.usage

    def take_usage(self, usage: dict[str, Any] | None) -> None:
        """The upstream's usage as a reader before this one took it out of the stream."""
        if usage is not None:
            self._reported = usage

    @property
    def pending(self) -> bytes:
        return self._scanner.pending

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        data = self._scanner.feed(chunk)
        if not data:
            return b""
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            payload = _payload(event)
            if payload is None:
                continue
            if payload.strip() == b"[DONE]":
                self._end(out)
                break
            self._chunk(orjson.loads(payload), out)
        return b"".join(out)

    def close(self) -> bytes:
        """At upstream EOF without [DONE]: the terminal events when a finish_reason came (some
        upstreams never send [DONE]); otherwise ValueError, a cut stream."""
        if self.done:
            return b""
        out: list[bytes] = []
        self._end(out)
        return b"".join(out)

    def _chunk(self, chunk: Any, out: list[bytes]) -> None:
        if type(chunk) is not dict:
            raise ValueError("an upstream chunk that is not a JSON object")
        if "error" in chunk:
            raise MessagesStreamError(chunk["error"])
        if not self._id:
            self._start(chunk)
        choices = chunk.get("choices")
        if type(choices) is not list:
            raise ValueError("an upstream chunk without choices")
        if not choices:
            return  # the include_usage chunk: the scanner took its usage
        choice = choices[0]
        delta = choice.get("delta") if type(choice) is dict else None
        if type(delta) is dict:
            self._delta(delta, out)
        if type(choice) is dict and choice.get("finish_reason") is not None:
            self._finish = choice["finish_reason"]

    def _start(self, chunk: dict[str, Any]) -> None:
        self._id = message_id(chunk.get("id"))
        message: dict[str, Any] = {
            "id": self._id, "type": "message", "role": "assistant", "content": [], "model": self.model,
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        self._held = sse("message_start", {"type": "message_start", "message": message})

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        reasoning, text, calls = delta.get("reasoning_content"), delta.get("content"), delta.get("tool_calls")
        if type(reasoning) is str and reasoning:
            self._text("thinking", reasoning, out)
        if type(text) is str and text:
            self._text("text", text, out)
        if calls:
            if type(calls) is not list:
                raise ValueError("tool_calls that are not an array")
            for call in calls:
                self._tool_delta(call, out)

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        if self._open == "tool_use":
            self._late.append((kind, text))  # a delta must never reach a closed tool block
            return
        if self._open != kind:
            self._close(out)
            empty = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
            self._open_block(kind, empty, out)
        field = "thinking" if kind == "thinking" else "text"
        delta = {"type": f"{field}_delta", field: text}
        out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}))

    def _tool_delta(self, call: Any, out: list[bytes]) -> None:
        index = call.get("index", 0) if type(call) is dict else None
        if type(index) is not int:
            raise ValueError("a tool call delta without an index")
        tool = self._tools.setdefault(index, _Tool())
        if call.get("id"):
            tool.id = call["id"]
        function = call.get("function")
        if type(function) is dict:
            if type(function.get("name")) is str and function["name"]:
                tool.name = self.tool_names.get(function["name"], function["name"])
            if type(function.get("arguments")) is str and function["arguments"]:
                tool.parts.append(function["arguments"])
        if self._open_tool == index:
            self._flush_arguments(tool, out)
        elif self._open != "tool_use" and tool.name and tool.block is None:
            self._close(out)
            self._announce(index, tool, out)

    def _announce(self, index: int, tool: _Tool, out: list[bytes]) -> None:
        block = tool_use_block_start(tool.id, tool.name, fallback_id=f"toolu_{self._id[4:]}_{index}")
        tool.block = self._blocks
        self._open_block("tool_use", block, out)
        self._open_tool = index
        self._flush_arguments(tool, out)

    def _flush_arguments(self, tool: _Tool, out: list[bytes]) -> None:
        if tool.parts:
            delta = {"type": "input_json_delta", "partial_json": "".join(tool.parts)}
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": tool.block, "delta": delta}))
            tool.parts = []
            tool.sent = True

    def _open_block(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        if not self.committed:
            out.append(self._held)
            self.committed = True
        out.append(sse("content_block_start", {"type": "content_block_start", "index": self._blocks, "content_block": block}))
        self._blocks += 1
        self._open = kind

    def _close(self, out: list[bytes]) -> None:
        if self._open is None:
            return
        if self._open_tool is not None and not self._tools[self._open_tool].sent:
            delta = {"type": "input_json_delta", "partial_json": "{}"}  # never an empty input
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}))
        out.append(sse("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1}))
        self._open = None
        self._open_tool = None

    def _end(self, out: list[bytes]) -> None:
        """[DONE] (or EOF): open block closed, buffered tools and text flushed, then
        message_delta with the stop reason and usage, then message_stop."""
        if self._finish is None:
            raise ValueError("the upstream stream ended without a finish_reason")
        if not self._id:
            raise ValueError("the upstream stream ended before any chunk")
        self._close(out)
        for index in sorted(self._tools):
            tool = self._tools[index]
            if tool.block is None:
                if not tool.name:
                    raise ValueError("a streamed tool call without a name")
                self._announce(index, tool, out)
                self._close(out)
        for kind, text in self._late:
            self._text(kind, text, out)
        self._close(out)
        if not self.committed:
            out.append(self._held)
            self.committed = True
        reason = stop_reason(self._finish, tool_use=bool(self._tools))
        usage = anthropic_usage(self.usage)
        if self.usage is None:
            usage["input_tokens"] = self.input_tokens
        delta = {"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": usage}
        out.append(sse("message_delta", delta))
        out.append(sse("message_stop", {"type": "message_stop"}))
        self.done = True


def tool_use_block_start(call_id: Any, name: str, *, fallback_id: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_use_id(call_id, fallback_id), "name": name, "input": {}}


def _payload(event: bytes) -> bytes | None:
    """An event's data: lines joined by LF; None for a comment or an event without data."""
    if event.startswith(b"data:") and b"\n" not in event:
        return event[5:]  # the usual shape: one data: line
    lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None
