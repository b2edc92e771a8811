"""Server-sent events as they pass through: event boundaries, the usage chunk, the end marker.

Works on raw bytes and never re-encodes what it relays; knows nothing of sockets. Bytes are split
at blank lines, never read line by line, and each byte is searched about once however an event is
cut into chunks: an unfinished event is held as its parts and joined once, when it ends. An event
too large to hold is an `UpstreamFailure`, like any other bad answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .httpmessage import UpstreamFailure

DONE = b"data: [DONE]"
# The largest events LLM APIs stream (a whole tool call's arguments, a partial image in base64)
# are a few MiB, and requests are capped at the same 8 MiB by default (server.max_body_bytes).
# An unfinished event past this is a broken or hostile upstream: holding more would let one
# stream take the gateway's memory.
MAX_EVENT_BYTES = 8 * 1024 * 1024
# How many held bytes a boundary completed by the next chunk can start in (`\r\n\r\n`, less one)
_SEAM = 3


class EventTooLarge(UpstreamFailure):
    """An upstream event grew past `MAX_EVENT_BYTES` before it ended: a bad answer, like any
    other the upstream reader finds."""

    def __init__(self) -> None:
        super().__init__("bad_response", f"an event over {MAX_EVENT_BYTES} bytes")


def event_boundary(data: bytes) -> int:
    """Index just past the last complete event in `data`, or 0 when none is complete."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class SseScanner:
    """Splits a relayed stream into whole events and takes the usage out of it.

    `feed` returns the bytes to send now: every complete event so far, minus the usage-only
    chunk when the client did not ask for it. An incomplete trailing event waits for the rest,
    up to `MAX_EVENT_BYTES` (then `feed` raises EventTooLarge).
    """

    __slots__ = ("strip_usage", "usage", "done", "_parts", "_held")

    END = DONE  # what marks the stream's end; a protocol's scanner names its own

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.done = False
        self._parts: list[bytes] = []  # the incomplete trailing event, as it came
        self._held = 0  # bytes in _parts

    @property
    def pending(self) -> bytes:
        return b"".join(self._parts)

    def feed(self, chunk: bytes) -> bytes:
        cut = event_boundary(chunk)
        if self._parts:
            data = self._complete(chunk, cut)
            if not data:
                return b""
        elif cut == len(chunk):  # the usual case: nothing held, a chunk of whole events
            data = chunk
        elif cut:
            self._hold(chunk[cut:])
            data = chunk[:cut]
        else:  # the start of an event, held: inline, since this runs for every split event
            self._parts.append(chunk)
            self._held = len(chunk)
            if self._held > MAX_EVENT_BYTES:
                raise EventTooLarge()
            return b""
        if not self.done and data.find(self.END) >= 0:
            self.done = True
        if data.find(b'"usage"') >= 0:
            data = self._take_usage(data)
        return data

    def _hold(self, part: bytes) -> None:
        self._parts.append(part)
        self._held += len(part)
        if self._held > MAX_EVENT_BYTES:
            raise EventTooLarge()

    def _complete(self, chunk: bytes, cut: int) -> bytes:
        """Adds `chunk`, whose last boundary ends at `cut`, to the held event; returns the
        events it completes, joined once, or b"". Only the new bytes were searched: a boundary
        may also span the seam, starting in the held bytes and ending early in `chunk`."""
        parts = self._parts
        if cut < _SEAM and chunk:
            cut = max(cut, _seam_cut(parts, chunk))
        if cut <= 0:
            if chunk:
                self._hold(chunk)
            return b""
        end = chunk if cut == len(chunk) else chunk[:cut]
        data = parts[0] + end if len(parts) == 1 else b"".join((*parts, end))
        parts.clear()
        self._held = 0
        if cut != len(chunk):
            self._hold(chunk[cut:])
        return data

    def _take_usage(self, data: bytes) -> bytes:
        """Records the usage object of any event carrying one; drops usage-only chunks if asked.

        Linear in `data` however many events carry usage: each search starts where the last
        event it examined ended, and what is kept is joined once.
        """
        kept: list[bytes] | None = None  # made only when a usage-only chunk goes
        start = floor = copied = 0  # floor: where the events not yet examined begin
        while (found := data.find(b'"usage"', start)) >= 0:
            start = found + 7
            if not _is_object_after(data, start):
                continue  # `"usage": null` rides on every chunk once usage is asked for
            begin = event_start(data, floor, found)
            start = floor = event_end(data, found, len(data))
            event = event_json(data[begin:start])
            if type(event) is not dict or type(event.get("usage")) is not dict:
                continue
            self.usage = event["usage"]
            if self.strip_usage and not event.get("choices"):
                if kept is None:
                    kept = []
                kept.append(data[copied:begin])
                copied = start
        if kept is None:
            return data
        kept.append(data[copied:])
        return b"".join(kept)


def _seam_cut(parts: list[bytes], chunk: bytes) -> int:
    """Where in `chunk` a boundary that starts in the held `parts` ends (at most 0 when none
    does): one starting in their last `_SEAM` bytes ends within the chunk's first `_SEAM`."""
    last = parts[-1] if len(parts[-1]) >= _SEAM else b"".join(parts[-_SEAM:])
    edge = last[-_SEAM:]
    return event_boundary(edge + chunk[:_SEAM]) - len(edge)


def _is_object_after(data: bytes, at: int) -> bool:
    """Whether the value after the key ending at `at` opens an object."""
    rest = data[at : at + 16].lstrip(b" \t:")
    return rest.startswith(b"{")


def event_start(data: bytes, floor: int, at: int) -> int:
    """Where the event holding `at` begins: past the last boundary before it. `floor` is an event
    start at or before `at`; a later boundary may overlap the one ending there (three line feeds)."""
    lf = data.rfind(b"\n\n", max(0, floor - 1), at)
    crlf = data.rfind(b"\r\n\r\n", max(0, floor - 3), at)
    return max(lf + 2 if lf >= 0 else floor, crlf + 4 if crlf >= 0 else floor)


def event_end(data: bytes, start: int, size: int) -> int:
    """Just past the first blank line at or after `start` (`\n\n` or `\r\n\r\n`), or `size`.
    Two bounded `find`s: a regex alternation scans several times slower."""
    lf = data.find(b"\n\n", start)
    lf = size if lf < 0 else lf + 2
    crlf = data.find(b"\r\n\r\n", start, lf)
    return lf if crlf < 0 else crlf + 4


def rewrite_events(data: bytes, rewrite: Callable[[bytes, int, int], bytes | None]) -> bytes:
    """`data` (whole SSE events) with each event `data[start:end]` for which `rewrite` answers
    bytes replaced by them (b"": dropped); `data` itself when none is. Linear in `data`: each
    byte is searched at most twice for a boundary, and what is kept is joined once."""
    kept: list[bytes] | None = None  # made only when an event changes
    start = copied = 0
    size = len(data)
    while start < size:
        end = event_end(data, start, size)
        replacement = rewrite(data, start, end)
        if replacement is not None:
            if kept is None:
                kept = []
            kept.append(data[copied:start])
            kept.append(replacement)
            copied = end
        start = end
    if kept is None:
        return data
    kept.append(data[copied:])
    return b"".join(kept)


def event_json(event: bytes) -> Any:
    """The JSON value of an SSE event's `data:` lines; None when they hold none (`[DONE]`, a comment)."""
    payload = b"\n".join(line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:"))
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
