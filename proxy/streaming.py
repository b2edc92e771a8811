"""Server-sent events as they pass through: event boundaries, the usage chunk, the end marker.

Works on raw bytes and never re-encodes what it relays; knows nothing of sockets. Events may be
any size: bytes are split at blank lines, never read line by line.
"""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"data: [DONE]"


def event_boundary(data: bytes) -> int:
    """Index just past the last complete event in `data`, or 0 when none is complete."""
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


class SseScanner:
    """Splits a relayed stream into whole events and takes the usage out of it.

    `feed` returns the bytes to send now: every complete event so far, minus the usage-only
    chunk when the client did not ask for it. An incomplete trailing event waits for the rest.
    """

    __slots__ = ("strip_usage", "usage", "done", "_tail")

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.usage: dict[str, Any] | None = None
        self.done = False
        self._tail = b""

    @property
    def pending(self) -> bytes:
        return self._tail

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk if self._tail else chunk
        cut = event_boundary(data)
        if cut == 0:
            self._tail = data
            return b""
        if cut == len(data):
            self._tail = b""
        else:
            self._tail = data[cut:]
            data = data[:cut]
        if not self.done and data.find(DONE) >= 0:
            self.done = True
        if data.find(b'"usage"') >= 0:
            data = self._take_usage(data)
        return data

    def _take_usage(self, data: bytes) -> bytes:
        """Records the usage object of any event carrying one; drops usage-only chunks if asked."""
        start = 0
        while (found := data.find(b'"usage"', start)) >= 0:
            start = found + 7
            if not _is_object_after(data, start):
                continue  # `"usage": null` rides on every chunk once usage is asked for
            begin = _event_start(data, found)
            end = _event_end(data, found)
            start = end
            event = _parse_event(data[begin:end])
            if event is None or type(event.get("usage")) is not dict:
                continue
            self.usage = event["usage"]
            if self.strip_usage and not event.get("choices"):
                data = data[:begin] + data[end:]
                start = begin
        return data


def _is_object_after(data: bytes, at: int) -> bool:
    """Whether the value after the key ending at `at` opens an object."""
    rest = data[at : at + 16].lstrip(b" \t:")
    return rest.startswith(b"{")


def _event_start(data: bytes, at: int) -> int:
    lf = data.rfind(b"\n\n", 0, at)
    crlf = data.rfind(b"\r\n\r\n", 0, at)
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def _event_end(data: bytes, at: int) -> int:
    ends = [i + n for i, n in ((data.find(b"\n\n", at), 2), (data.find(b"\r\n\r\n", at), 4)) if i >= 0]
    return min(ends) if ends else len(data)


def _parse_event(event: bytes) -> dict[str, Any] | None:
    """The JSON of an event's `data:` lines, or None when it is not a JSON object."""
    payload = b"\n".join(
        line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
    )
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return value if type(value) is dict else None
