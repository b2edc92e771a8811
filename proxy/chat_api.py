"""OpenAI's Chat Completions API (`POST /v1/chat/completions`) as a client API.

The provider seam speaks it already, so providers serve it as they are; errors are OpenAI's
shape (SPEC §4).
"""

from __future__ import annotations

from typing import Any, Mapping

from .errors import GatewayError
from .metrics import Metrics
from .upstream import Provider
from .validation import ChatRequest, parse_chat_request


class ChatApi:
    name = shape = "chat"

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ChatRequest:
        return parse_chat_request(body)

    def session(self, parsed: Any, headers: Mapping[str, str]) -> str | None:
        return headers.get("x-session-id") or _str_or_none(parsed.data.get("user"))

    def error_response(self, error: GatewayError, request_id: str) -> tuple[int, bytes]:
        return error.status, error.body()

    def error_event(self, error: GatewayError) -> bytes:
        return error.sse_event()

    def adapt(self, provider: Provider, metrics: Metrics | None = None) -> Provider:
        return provider


CHAT = ChatApi()


def _str_or_none(value: object) -> str | None:
    return value if type(value) is str and value else None
