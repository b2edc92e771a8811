"""The access log: one JSON line per request on stdout, written in batches.

A flushed write per line costs a noticeable share of a request, so lines are buffered and
written at most every `interval_s` (and at once past `max_buffer` bytes, and on close).
Never sees a key or message content: the caller hands it names and numbers only.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import orjson


class AccessLog:
    def __init__(self, *, fd: int = 1, interval_s: float = 0.05, max_buffer: int = 64 * 1024) -> None:
        self._fd = fd
        self._interval_s = interval_s
        self._max_buffer = max_buffer
        self._lines: list[bytes] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self._max_buffer:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except BlockingIOError:
                continue
            view = view[written:]
