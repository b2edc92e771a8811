"""Talking to an OpenAI-compatible upstream: one connection pool per provider, one exchange per attempt.

Deadlines are the caller's (forward sets them around every read); this module only sends and
reads bytes, through `http1`, whose errors (`UpstreamFailure`) are the only ones it raises.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Protocol

from .config import AccountConfig, ProviderConfig
from .http1 import Pool
from .httpmessage import UpstreamFailure

__all__ = ["Exchange", "OpenAIProvider", "Provider", "UpstreamFailure"]


class Exchange(Protocol):
    """One upstream answer being read: status and headers first, then the body in chunks."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    async def read(self) -> bytes:
        """The next body chunk as it arrives; b"" at the end."""

    @property
    def finished(self) -> bool:
        """Whether the whole body has been read."""

    def close(self) -> None:
        """Stops reading; an unfinished upstream request is aborted."""


class Provider(Protocol):
    config: ProviderConfig

    async def send(
        self, account: AccountConfig, body: bytes, data: dict[str, Any], request_id: str
    ) -> Exchange: ...

    async def probe(self, account: AccountConfig) -> bool: ...

    async def close(self) -> None: ...


class OpenAIProvider:
    """Any OpenAI-compatible API at the provider's `base_url`."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._pool = Pool(config.base_url, connect_timeout_s=config.timeouts.connect_s)
        self._chat = self._pool.target("/chat/completions")
        self._models = self._pool.target("/models")
        # whole header lines per account, built once; the request id is added per request
        self._headers = {
            account.name: (
                b"Authorization: Bearer %s\r\n"
                b"Content-Type: application/json\r\n"
                b"Accept: application/json, text/event-stream\r\n"
                b"User-Agent: llm-proxy\r\n" % _header_value(account.api_key)
            )
            for account in config.accounts
        }

    async def send(
        self, account: AccountConfig, body: bytes, data: dict[str, Any], request_id: str
    ) -> Exchange:
        # request ids are printable by construction (checked where they enter, or generated)
        headers = self._headers[account.name] + b"X-Request-Id: " + request_id.encode() + b"\r\n"
        return await self._pool.request(b"POST", self._chat, headers, body)

    async def probe(self, account: AccountConfig) -> bool:
        """GET {base_url}/models with the account's key: whether it answers 2xx."""
        headers = self._headers[account.name].partition(b"\r\n")[0] + b"\r\n"  # Authorization only
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte_s):
                response = await self._pool.request(b"GET", self._models, headers)
                try:
                    while await response.read():
                        pass
                finally:
                    response.close()
                return 200 <= response.status < 300
        except (UpstreamFailure, TimeoutError):
            return False

    async def close(self) -> None:
        await self._pool.close()


def _header_value(value: str) -> bytes:
    """`value` as header bytes; a line break in it would start a header of its own."""
    encoded = value.encode()
    if b"\r" in encoded or b"\n" in encoded or b"\0" in encoded:
        raise ValueError("line break in a header value")
    return encoded
