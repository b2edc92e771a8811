"""Response guardrails on a stream: a `StreamReader` around the provider's that holds events
back just long enough to catch a match split across them, and redacts inside the events.

Each text channel (a choice's content, a tool call's arguments, an Anthropic content block) is
scanned as one text. An event is released once every text it carries lies at least
`HOLD_BYTES` before the end of its channel's text so far, and before the start of any
candidate still touching that tail (so a match growing past the hold is held too, up to
`MAX_HOLD_BYTES`); a channel's end (finish_reason, `content_block_stop`, `[DONE]`) releases
all it held. Events leave in order and whole: an unchanged one as its bytes, a redacted one
re-encoded with the marker where its match began (the rest of a match cut from later events).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from ..streaming import event_end, event_json
from ..upstream import Around, InBandError, StreamReader
from .detectors import Match
from .extract import Path
from .prefilter import maybe
from .redact import marker, merged
from .rules import Hit, Scan

# 64 bytes cover every built-in shape before it can first match (an IBAN with spaces is 42, an
# IPv6 address 39, a key prefix with its 20 characters 23, a private key's armour 37); from
# then on the candidate itself extends the hold. At ~4 characters a token, 16 tokens.
HOLD_BYTES = 64
MAX_HOLD_BYTES = 4096  # past this a channel's text is released even while a candidate grows
ALL = "*"
JSON_FIELDS = ("arguments", "partial_json")
_TEXT = ("text",)  # the one root of the prefilter's body  # texts that are pieces of one JSON document
Key = tuple[Any, ...]


class _Channel:
    __slots__ = ("text", "base", "closed", "hits", "scan_from", "cut_until", "safe", "json", "lexed")

    def __init__(self, *, json: bool = False) -> None:
        self.text = b""  # from `base`, the start of its first unreleased piece
        self.base = 0
        self.closed = False
        self.hits: list[Hit] = []  # absolute offsets
        self.scan_from = 0  # text before this has been judged (a released match ends here)
        self.cut_until = 0  # a redacted match that began in a released event ends here
        self.safe = 0  # pieces ending at or before this may leave
        # a JSON document streamed in pieces (tool arguments, partial_json): whether `base` lies
        # inside one of its strings, and just after a backslash there
        self.json = json
        self.lexed = (False, False)

    @property
    def end(self) -> int:
        return self.base + len(self.text)

    def inside_string(self, at: int) -> bool:
        """Whether the byte at `at` (not before `base`) lies inside a string of the JSON text."""
        return _lexed(self.lexed, self.text[: at - self.base])[0]

    def advance(self, to: int) -> None:
        """Releases the text before `to`."""
        if self.json:
            self.lexed = _lexed(self.lexed, self.text[: to - self.base])
        self.text = self.text[to - self.base :]
        self.base = to


# A JSON text's string boundaries: a quote, an escaped character, or a backslash cut from the
# character it escapes by the end of a piece.
_QUOTE_OR_ESCAPE = re.compile(rb'\\.|\\$|"', re.DOTALL)


def _lexed(state: tuple[bool, bool], data: bytes) -> tuple[bool, bool]:
    """(inside a string, after a backslash) at the end of `data`, from `state` at its start."""
    inside, escaped = state
    start = 0
    if escaped and data:
        start, escaped = 1, False
    for found in _QUOTE_OR_ESCAPE.finditer(data, start):
        token = found.group()
        if token == b'"':
            inside = not inside
        elif len(token) == 1:
            escaped = True
    return inside, escaped


class _Piece:
    __slots__ = ("key", "path", "start", "end")

    def __init__(self, key: Key, path: Path, start: int, end: int) -> None:
        self.key, self.path, self.start, self.end = key, path, start, end


class _Event:
    __slots__ = ("raw", "data", "pieces")

    def __init__(self, raw: bytes, data: Any, pieces: list[_Piece]) -> None:
        self.raw, self.data, self.pieces = raw, data, pieces


class GuardedStream(Around):
    """`inner`'s events with response guardrails applied; the same interface as `inner`."""

    __slots__ = ("_scan", "_texts", "_found", "_queue", "_channels")

    def __init__(self, inner: StreamReader, scan: Scan, api: str, found: Callable[[list[Hit]], None]) -> None:
        super().__init__(inner)
        self._scan = scan
        self._texts = _chat_texts if api == "chat" else _messages_texts
        self._found = found
        self._queue: deque[_Event] = deque()
        self._channels: dict[Key, _Channel] = {}

    def feed(self, chunk: bytes) -> bytes:
        try:
            data = self._inner.feed(chunk)
        except InBandError as exc:
            if not exc.tail:
                raise
            # the upstream's own end of a committed stream (a pass-through's `event: error`): what
            # came before it is guarded like every event, and the error releases all that is held
            raise InBandError(exc.verdict, exc.detail, tail=self._through(exc.tail)) from None
        return self._through(data)

    def _through(self, data: bytes) -> bytes:
        start, size = 0, len(data)
        while start < size:
            end = event_end(data, start, size)
            self._take(data[start:end])
            start = end
        return self._release()

    def _take(self, raw: bytes) -> None:
        data = event_json(raw) if b"data:" in raw else None
        pieces: list[_Piece] = []
        touched: set[Key] = set()
        closes: set[Key] = set()
        if raw.lstrip().startswith(b"data: [DONE]"):
            closes.add((ALL,))
        elif data is not None:
            for key, path, text in self._texts(data, closes):
                encoded = text.encode()
                channel = self._channels.get(key)
                if channel is None:
                    channel = self._channels[key] = _Channel(json=path[-1] in JSON_FIELDS)
                pieces.append(_Piece(key, path, channel.end, channel.end + len(encoded)))
                channel.text += encoded
                touched.add(key)
        self._queue.append(_Event(raw, data, pieces))
        for key, channel in self._channels.items():
            if (ALL,) in closes or key in closes or key[:1] in closes:
                channel.closed = True
                touched.add(key)
        for key in touched:
            self._judge(self._channels[key])

    def _judge(self, channel: _Channel) -> None:
        """Rescans the channel's unjudged text: its hits, and how far its pieces may leave."""
        offset = max(channel.base, channel.scan_from)
        text = channel.text[offset - channel.base :]
        bits = self._scan.bits
        if bits is not None and not maybe({"text": text}, _TEXT, bits):
            # no candidate, so neither a hit nor anything growing: only the hold-back is held
            channel.hits = []
            channel.safe = channel.end if channel.closed else channel.end - HOLD_BYTES
            return
        hits = [Hit(h.guardrail, 0, Match(h.match.category, h.match.start + offset, h.match.end + offset))
                for h in self._scan.hits([text])] if text else []
        channel.hits = hits
        if channel.closed:
            channel.safe = channel.end
            return
        safe = channel.end - HOLD_BYTES
        if len(text) <= MAX_HOLD_BYTES:
            for start, end in self._candidates(text):
                if end + offset > safe:
                    safe = min(safe, start + offset)
        channel.safe = safe

    def _candidates(self, text: bytes) -> Iterator[tuple[int, int]]:
        if self._scan.detector is not None:
            for start, end, _ in self._scan.detector.candidates(text):
                yield start, end
        for guardrail in self._scan.guardrails:
            for _, pattern in guardrail.patterns:
                for found in pattern.finditer(text):
                    yield found.span()

    def _release(self) -> bytes:
        out: list[bytes] = []
        while self._queue and all(p.end <= self._channels[p.key].safe for p in self._queue[0].pieces):
            out.append(self._render(self._queue.popleft()))
        for key in [k for k, c in self._channels.items() if c.closed and c.end <= c.base]:
            del self._channels[key]
        return b"".join(out)

    def _render(self, event: _Event) -> bytes:
        changed: list[tuple[Path, str]] = []
        for piece in event.pieces:
            channel = self._channels[piece.key]
            text = self._redacted(channel, piece)
            if text is not None:
                changed.append((piece.path, text))
            channel.advance(piece.end)
        if not changed:
            return event.raw
        for path, text in changed:
            node = event.data
            for step in path[:-1]:
                node = node[step]
            node[path[-1]] = text
        return _encoded(event.raw, event.data)

    def _redacted(self, channel: _Channel, piece: _Piece) -> str | None:
        """The piece's text with its matches redacted; None when nothing in it changes."""
        starting = [h for h in channel.hits if piece.start <= h.match.start < piece.end]
        if starting:
            self._found(starting)
            channel.scan_from = max(channel.scan_from, max(h.match.end for h in starting))
        redacting = merged([h.match for h in channel.hits if h.guardrail.action == "redact"])
        if channel.cut_until <= piece.start and not any(
            m.start < piece.end and m.end > piece.start for m in redacting
        ):
            return None
        parts: list[bytes] = []
        position = max(piece.start, min(channel.cut_until, piece.end))
        for match in redacting:
            if match.end <= position or match.start >= piece.end:
                continue
            if match.start >= position:
                parts.append(self._slice(channel, position, match.start))
                replacement = marker(match.category).encode()
                if channel.json and not channel.inside_string(match.start):
                    replacement = b'"' + replacement + b'"'  # a number: the document stays JSON
                parts.append(replacement)
            position = min(piece.end, match.end)
            channel.cut_until = max(channel.cut_until, match.end)
        parts.append(self._slice(channel, position, piece.end))
        return b"".join(parts).decode(errors="replace")

    @staticmethod
    def _slice(channel: _Channel, start: int, end: int) -> bytes:
        return channel.text[start - channel.base : end - channel.base]


def _chat_texts(data: Any, closes: set[Key]) -> Iterator[tuple[Key, Path, str]]:
    """The texts of an OpenAI `chat.completion.chunk`; a choice's finish_reason closes it."""
    if type(data) is not dict:
        return
    if "error" in data:
        closes.add((ALL,))
    choices = data.get("choices")
    if type(choices) is not list:
        return
    for position, choice in enumerate(choices):
        if type(choice) is not dict:
            continue
        index = choice.get("index", position)
        delta = choice.get("delta")
        if type(delta) is dict:
            base: Path = ("choices", position, "delta")
            for field in ("content", "refusal"):
                if type(delta.get(field)) is str and delta[field]:
                    yield (index, field), (*base, field), delta[field]
            calls = delta.get("tool_calls")
            for slot, call in enumerate(calls if type(calls) is list else ()):
                function = call.get("function") if type(call) is dict else None
                if type(function) is dict and type(function.get("arguments")) is str and function["arguments"]:
                    key = (index, "tool", call.get("index", slot))
                    yield key, (*base, "tool_calls", slot, "function", "arguments"), function["arguments"]
        if choice.get("finish_reason") is not None:
            closes.add((index,))


def _messages_texts(data: Any, closes: set[Key]) -> Iterator[tuple[Key, Path, str]]:
    """The texts of an Anthropic stream event; `content_block_stop` closes its block."""
    if type(data) is not dict:
        return
    kind = data.get("type")
    if kind == "content_block_delta":
        delta = data.get("delta")
        if type(delta) is dict:
            field = {"text_delta": "text", "input_json_delta": "partial_json"}.get(delta.get("type", ""))
            if field is not None and type(delta.get(field)) is str and delta[field]:
                yield (data.get("index"),), ("delta", field), delta[field]
    elif kind == "content_block_stop":
        closes.add((data.get("index"),))
    elif kind in ("message_delta", "message_stop", "error"):
        closes.add((ALL,))


def _encoded(raw: bytes, data: Any) -> bytes:
    """The event `raw` with its data lines replaced by `data`; its other lines (`event:`) kept."""
    lines = [line for line in raw.splitlines() if line and not line.startswith(b"data:")]
    lines.append(b"data: " + orjson.dumps(data))
    return b"\n".join(lines) + b"\n\n"
