"""What every fake upstream shares: the record of each request it received, and its script of
answers (the next scripted reply, else the default)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from aiohttp import web

R = TypeVar("R")


@dataclass
class Received:
    method: str
    target: str  # path and query, exactly as sent
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


class Scripted(Generic[R]):
    """Answers from `replies` in order, then `default`; every request is kept in `requests`."""

    def __init__(self, default: R) -> None:
        self.replies: deque[R] = deque()
        self.default = default
        self.requests: list[Received] = []

    def script(self, *replies: R) -> None:
        """Answers for the next requests, in order; then `default`."""
        self.replies.extend(replies)

    def next_reply(self) -> R:
        return self.replies.popleft() if self.replies else self.default

    async def _receive(self, request: web.Request) -> Received:
        headers = {k.lower(): v for k, v in request.headers.items()}
        received = Received(request.method, request.raw_path, headers, await request.read())
        self.requests.append(received)
        return received
