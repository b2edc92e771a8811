"""Anthropic SSE → OpenAI `chat.completion.chunk` SSE (reference §3), fed raw upstream bytes.

Owns event framing, the held role chunk (the stream commits at its first content-bearing chunk),
tool-call ordinals, the terminal sequence and the running usage; same interface as
`streaming.SseScanner`, so one relay loop drives either. Pure: no I/O, no clock; linear in the
bytes fed (an unfinished event's pieces are joined once, when it completes).
"""

from __future__ import annotations

from typing import Any

import orjson

from ..streaming import MAX_EVENT_BYTES
from .anthropic_answer import JSON_TOOL, finish_reason, label, openai_usage
from .anthropic_errors import ERROR_STATUSES

DONE = b"data: [DONE]\n\n"
_ROLE = b'{"role":"assistant","content":""}'
_EMPTY_ARGUMENTS = "{}"


class AnthropicStreamError(Exception):
    """An in-band `event: error`: classify it as an answer of `verdict_status` with `body()`."""

    def __init__(self, verdict_status: int, error_type: str, message: str) -> None:
        super().__init__(f"anthropic {error_type}: {message}")
        self.verdict_status = verdict_status
        self.error_type = error_type
        self.message = message

    def body(self) -> bytes:
        """The error as Anthropic's error body, for `classify_anthropic` and `caller_error`."""
        return orjson.dumps({"type": "error", "error": {"type": self.error_type, "message": self.message}})


class AnthropicStream:
    """Converts one upstream stream. `feed` returns the client's bytes to send now; nothing until
    the first content-bearing chunk (message_start's role chunk and pings are held), so an error
    before it leaves the client untouched and the request may fail over."""

    __slots__ = (
        "include_usage", "created", "json_mode", "usage", "done", "committed", "unknown",
        "dropped_blocks", "_parts", "_held", "_edge", "_raw_usage", "_head", "_prefix", "_suffix",
        "_role", "_stop", "_tools", "_slots", "_empty", "_json_block",
    )

    def __init__(self, *, include_usage: bool, created: int, json_mode: bool = False) -> None:
        self.include_usage = include_usage
        self.created = created
        self.json_mode = json_mode
        self.usage: dict[str, Any] | None = None  # OpenAI-shaped, the latest figures seen
        self.done = False  # message_stop seen and the terminal sequence returned
        self.committed = False  # some feed returned client bytes
        self.unknown: list[tuple[str, str]] = []  # (field, value) mapped to a default
        self.dropped_blocks: list[str] = []  # content block types with no OpenAI form
        self._parts: list[bytes] = []  # the unfinished event's pieces
        self._held = 0
        self._edge = b""  # its last two bytes: a blank line may straddle two chunks
        self._raw_usage: dict[str, Any] = {}
        self._head = b""  # `{"id":…,"object":…,"created":…,"model":…,` of every chunk
        self._prefix = b""
        self._suffix = b""
        self._role = b""  # the held role chunk
        self._stop: Any = None
        self._tools = 0  # tool calls seen: the next one's OpenAI index
        self._slots: dict[int, int] = {}  # content block index → tool call index
        self._empty: set[int] = set()  # tool blocks whose input has had no bytes yet
        self._json_block: int | None = None

    @property
    def pending(self) -> bytes:
        return b"".join(self._parts)

    def feed(self, chunk: bytes) -> bytes:
        """ValueError for a malformed event or one over streaming.MAX_EVENT_BYTES (the cap of
        pass-through streams); AnthropicStreamError for `event: error`.
        The output of a feed that raises is discarded (it was never the client's)."""
        if self.done or not chunk:
            return b""
        if not self._parts and chunk.endswith(b"\n\n"):
            complete = chunk  # the usual read: whole events
        else:
            complete = self._complete(chunk)
            if not complete:
                return b""
        committed = self.committed
        try:
            return self._events(complete)
        except BaseException:
            self.committed = committed
            raise

    def _complete(self, chunk: bytes) -> bytes:
        """The events `chunk` completes (b"" when none); holds what follows the last of them."""
        probe = self._edge + chunk if self._edge else chunk
        lf, crlf = probe.rfind(b"\n\n"), probe.rfind(b"\n\r\n")
        cut = max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0) - len(self._edge)
        if cut <= 0:
            self._hold(chunk)
            return b""
        complete = chunk[:cut]
        if self._parts:
            self._parts.append(complete)
            complete = b"".join(self._parts)
        self._parts, self._held, self._edge = [], 0, b""
        if cut < len(chunk):
            self._hold(chunk[cut:])
        return complete

    def _hold(self, piece: bytes) -> None:
        self._parts.append(piece)
        self._held += len(piece)
        if self._held > MAX_EVENT_BYTES:
            raise ValueError(f"an upstream event over {MAX_EVENT_BYTES} bytes")
        self._edge = (self._edge + piece)[-2:] if len(piece) < 2 else piece[-2:]

    def _events(self, data: bytes) -> bytes:
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        out: list[bytes] = []
        for event in data.split(b"\n\n"):
            if not event:
                continue
            if len(event) > MAX_EVENT_BYTES:
                raise ValueError(f"an upstream event over {MAX_EVENT_BYTES} bytes")
            start = event.find(b"data:")
            if start < 0:
                continue  # a comment, or an event: line alone
            if (start == 0 or event[start - 1] == 10) and event.find(b"\n", start) < 0:
                payload: bytes | None = event[start + 5 :]  # the usual shape: one data: line, last
            else:
                payload = _payload(event)
            if payload is None:
                continue
            parsed = orjson.loads(payload)
            delta = parsed.get("delta") if type(parsed) is dict else None
            text = delta.get("text") if type(delta) is dict and delta.get("type") == "text_delta" else None
            if type(text) is str and text and self.committed and parsed.get("type") == "content_block_delta":
                out.append(self._prefix + orjson.dumps({"content": text}) + self._suffix)  # most events
                continue
            self._dispatch(parsed, out)
            if self.done:
                break
        return b"".join(out)

    def _dispatch(self, event: Any, out: list[bytes]) -> None:
        kind = event.get("type") if type(event) is dict else None
        if kind == "content_block_delta":
            self._delta(event, out)
        elif kind == "content_block_start":
            self._block_start(event, out)
        elif kind == "content_block_stop":
            self._block_stop(_index(event), out)
        elif kind == "message_delta":
            self._message_delta(event)
        elif kind == "message_start":
            self._message_start(event.get("message"))
        elif kind == "message_stop":
            self._finish(out)
        elif kind == "error":
            raise _stream_error(event.get("error"))
        elif kind is None:
            raise ValueError("an upstream event that is not a typed JSON object")
        # ping, and event types added later, show the client nothing

    def _message_start(self, message: Any) -> None:
        if type(message) is not dict or type(message.get("id")) is not str or type(message.get("model")) is not str:
            raise ValueError("message_start without a message id and model")
        self._head = b"".join((
            b'{"id":', orjson.dumps(message["id"]), b',"object":"chat.completion.chunk","created":',
            str(self.created).encode(), b',"model":', orjson.dumps(message["model"]), b",",
        ))
        self._prefix = b"data: " + self._head + b'"choices":[{"index":0,"delta":'
        self._suffix = b',"logprobs":null,"finish_reason":null}]' + (b',"usage":null' if self.include_usage else b"") + b"}\n\n"
        self._role = self._prefix + _ROLE + self._suffix
        if type(message.get("usage")) is dict:
            self._raw_usage = dict(message["usage"])
            self.usage = openai_usage(self._raw_usage)

    def _emit(self, delta: dict[str, Any], out: list[bytes]) -> None:
        if not self.committed:
            if not self._prefix:
                raise ValueError("content before message_start")
            out.append(self._role)
            self.committed = True
        out.append(self._prefix + orjson.dumps(delta) + self._suffix)

    def _block_start(self, event: dict[str, Any], out: list[bytes]) -> None:
        block = event.get("content_block")
        if type(block) is not dict:
            raise ValueError("content_block_start without a content block")
        kind = block.get("type")
        if kind == "text":
            if type(block.get("text")) is str and block["text"]:
                self._emit({"content": block["text"]}, out)
        elif kind == "tool_use":
            self._tool_start(_index(event), block, out)
        elif kind == "thinking":
            if type(block.get("thinking")) is str and block["thinking"]:
                self._emit({"reasoning_content": block["thinking"]}, out)
        elif kind != "redacted_thinking":
            self.dropped_blocks.append(label(kind))

    def _tool_start(self, index: int, block: dict[str, Any], out: list[bytes]) -> None:
        name, tool_id = block.get("name"), block.get("id")
        if type(name) is not str or type(tool_id) is not str:
            raise ValueError("a tool_use block without id and name")
        self._empty.add(index)
        if self.json_mode and name == JSON_TOOL:
            self._json_block = index
        else:
            self._slots[index] = self._tools
            call = {"index": self._tools, "id": tool_id, "type": "function", "function": {"name": name, "arguments": ""}}
            self._tools += 1
            self._emit({"tool_calls": [call]}, out)
        if block.get("input"):  # a whole input up front: not what Anthropic sends, but valid
            self._arguments(index, orjson.dumps(block["input"]).decode(), out)

    def _arguments(self, index: int, text: str, out: list[bytes]) -> None:
        self._empty.discard(index)
        if index == self._json_block:
            self._emit({"content": text}, out)
            return
        slot = self._slots.get(index)
        if slot is None:
            raise ValueError("input_json_delta for a block that is not a tool_use")
        self._emit({"tool_calls": [{"index": slot, "function": {"arguments": text}}]}, out)

    def _delta(self, event: dict[str, Any], out: list[bytes]) -> None:
        delta = event.get("delta")
        if type(delta) is not dict:
            raise ValueError("content_block_delta without a delta")
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if type(text) is str and text:
                self._emit({"content": text}, out)
        elif kind == "input_json_delta":
            part = delta.get("partial_json")
            if type(part) is str and part:
                self._arguments(_index(event), part, out)
        elif kind == "thinking_delta":
            thinking = delta.get("thinking")
            if type(thinking) is str and thinking:
                self._emit({"reasoning_content": thinking}, out)
        # signature_delta, citations_delta: nothing the client's chunks can carry

    def _block_stop(self, index: int, out: list[bytes]) -> None:
        if index in self._empty:  # a tool called without input: its arguments are "{}", never ""
            self._arguments(index, _EMPTY_ARGUMENTS, out)

    def _message_delta(self, event: dict[str, Any]) -> None:
        delta = event.get("delta")
        if type(delta) is dict and delta.get("stop_reason") is not None:
            self._stop = delta["stop_reason"]
        usage = event.get("usage")
        if type(usage) is dict:  # cumulative figures: the latest of each wins, never summed
            self._raw_usage.update((key, value) for key, value in usage.items() if value is not None)
            self.usage = openai_usage(self._raw_usage)

    def _finish(self, out: list[bytes]) -> None:
        """message_stop: the role chunk if still held, one finish chunk, the usage chunk when
        asked for, then [DONE]."""
        if not self._prefix:
            raise ValueError("message_stop before message_start")
        if not self.committed:
            out.append(self._role)
            self.committed = True
        finish = finish_reason(self._stop, self.unknown, called=self._tools > 0)
        null_usage = b',"usage":null' if self.include_usage else b""
        out.append(
            self._prefix + b'{},"logprobs":null,"finish_reason":"' + finish.encode() + b'"}]' + null_usage + b"}\n\n"
        )
        if self.include_usage:
            usage = self.usage if self.usage is not None else openai_usage({})
            out.append(b"data: " + self._head + b'"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
        out.append(DONE)
        self.done = True


def _index(event: dict[str, Any]) -> int:
    index = event.get("index")
    if type(index) is not int:
        raise ValueError(f"{event.get('type')} without a block index")
    return index


def _stream_error(error: Any) -> AnthropicStreamError:
    error = error if type(error) is dict else {}
    error_type, message = error.get("type"), error.get("message")
    error_type = error_type if type(error_type) is str else "api_error"
    message = message if type(message) is str else ""
    return AnthropicStreamError(ERROR_STATUSES.get(error_type, 500), error_type, message)


def _payload(event: bytes) -> bytes | None:
    """The data of an event with several lines: its data: lines joined by LF; None without any."""
    lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)
