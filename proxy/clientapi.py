"""The seam between the request path and the APIs clients speak: what differs per client API.

The pipeline runs the same stages for every client API (SPEC §3, §10); an API module (`chat_api`
for OpenAI's Chat Completions, `messages_api` for Anthropic's Messages) says how its bodies are
parsed and validated, how the gateway's errors look to its clients, and which provider serves
its requests (the provider itself, or the provider behind a converter). This module holds only
the interface; it imports nothing of the request path.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from .errors import GatewayError
from .metrics import Metrics
from .upstream import Provider


class ClientRequest(Protocol):
    """A validated request body, as the request path reads it."""

    @property
    def data(self) -> dict[str, Any]: ...

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...

    @property
    def n(self) -> int: ...

    @property
    def max_tokens(self) -> int | None: ...

    @property
    def request_id(self) -> str | None:
        """The body's own request id (chat's `request_id`), or None."""

    def with_data(self, data: dict[str, Any]) -> ClientRequest:
        """The same request with its body replaced by `data` (a redacted copy)."""


class ClientApi(Protocol):
    @property
    def name(self) -> str:
        """`chat`, `messages` or `count_tokens`: the access log's `api`, the metrics' label."""

    @property
    def shape(self) -> str:
        """`chat` or `messages`: the shape of its bodies, answers and streams (what guardrails read)."""

    def parse(self, body: bytes, headers: Mapping[str, str]) -> ClientRequest:
        """The body validated; GatewayError 400 naming what is wrong."""

    def session(self, parsed: Any, headers: Mapping[str, str]) -> str | None:
        """What keys a sticky session (SPEC §5, §10), if anything."""

    def error_response(self, error: GatewayError, request_id: str) -> tuple[int, bytes]:
        """The status and JSON body a client of this API gets for `error`."""

    def error_event(self, error: GatewayError) -> bytes:
        """The terminal event of a stream of this API that failed after it started."""

    def adapt(self, provider: Provider, metrics: Metrics | None = None) -> Provider:
        """`provider` as it serves this API's requests (built once per provider)."""
