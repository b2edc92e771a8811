"""Talking to an OpenAI-compatible upstream: one pooled session per provider, one exchange per attempt.

Translates aiohttp's transport errors into `UpstreamFailure` here, once. Deadlines are the
caller's (forward sets them around every read); this module only sends and reads bytes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Protocol

import aiohttp
from multidict import CIMultiDictProxy

from .config import AccountConfig, ProviderConfig


class UpstreamFailure(Exception):
    """An attempt that got no usable answer: `kind` is `connect` or `bad_response`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


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


class HttpExchange:
    __slots__ = ("status", "headers", "_response")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: CIMultiDictProxy[str] = response.headers

    async def read(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamFailure("bad_response", f"body cut: {type(exc).__name__}") from None

    @property
    def finished(self) -> bool:
        return self._response.content.at_eof()

    def close(self) -> None:
        # close(), not release(): an unread body means the request must not go on upstream
        self._response.close()


class OpenAIProvider:
    """Any OpenAI-compatible API at the provider's `base_url`."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        self._url = f"{config.base_url}/chat/completions"
        self._headers = {
            account.name: {
                "Authorization": f"Bearer {account.api_key}",
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                # set here, so aiohttp adds none of its own (skip_auto_headers costs ~5% a request)
                "User-Agent": "llm-proxy",
            }
            for account in config.accounts
        }
        timeouts = config.timeouts
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect_s, sock_connect=timeouts.connect_s
            ),
            auto_decompress=False,
        )

    async def send(
        self, account: AccountConfig, body: bytes, data: dict[str, Any], request_id: str
    ) -> Exchange:
        headers = {**self._headers[account.name], "X-Request-Id": request_id}
        try:
            try:
                response = await self._session.post(self._url, data=body, headers=headers)
            except aiohttp.ServerDisconnectedError:
                # a pooled keep-alive connection the upstream had already closed: once more, fresh
                response = await self._session.post(self._url, data=body, headers=headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            raise UpstreamFailure("connect", type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure("bad_response", type(exc).__name__) from None
        return HttpExchange(response)

    async def probe(self, account: AccountConfig) -> bool:
        """GET {base_url}/models with the account's key: whether it answers 2xx."""
        try:
            async with self._session.get(
                f"{self.config.base_url}/models",
                headers={"Authorization": self._headers[account.name]["Authorization"]},
                timeout=aiohttp.ClientTimeout(total=self.config.timeouts.first_byte_s),
            ) as response:
                return 200 <= response.status < 300
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def close(self) -> None:
        await self._session.close()
