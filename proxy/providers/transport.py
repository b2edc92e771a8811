"""`Transport`: how a provider reaches its host — one keep-alive pool, each account's header lines
built once, and the probe of a quarantined account.

Shared by every provider type that talks HTTP; the type decides the auth header, the paths and
the extra headers. Knows nothing of bodies or answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..config import AccountConfig, ProviderConfig
from ..http1 import Pool, Response
from ..httpmessage import UpstreamFailure
from ..upstream import Exchange

COMMON_HEADERS = (
    b"Content-Type: application/json\r\n"
    b"Accept: application/json, text/event-stream\r\n"
    b"User-Agent: llm-proxy\r\n"
)


class Carrier(Protocol):
    """What carries a provider's requests: `Transport` over HTTP, or the mock's in process."""

    def target(self, path: str) -> bytes: ...

    async def post(
        self, account: AccountConfig, target: bytes, body: bytes, request_id: str, headers: bytes = b""
    ) -> Exchange:
        """`headers`: whole header lines of this request beyond the account's."""

    async def probe(self, account: AccountConfig) -> bool: ...

    async def close(self) -> None: ...


class Transport:
    """`auth(key)` is the account's credential header line; `extra` lines go on every request."""

    def __init__(
        self, config: ProviderConfig, *, auth: Callable[[bytes], bytes], probe_path: str,
        extra: bytes = b"",
    ) -> None:
        self.config = config
        self.pool = Pool(config.base_url, connect_timeout_s=config.timeouts.connect_s)
        self._probe = self.pool.target(probe_path)
        self._auth = {account.name: auth(header_value(account.api_key)) for account in config.accounts}
        # whole header lines per account, built once; the request id is added per request
        self._headers = {name: line + COMMON_HEADERS + extra for name, line in self._auth.items()}

    def target(self, path: str) -> bytes:
        return self.pool.target(path)

    async def post(
        self, account: AccountConfig, target: bytes, body: bytes, request_id: str, headers: bytes = b""
    ) -> Response:
        # request ids are printable by construction (checked where they enter, or generated)
        lines = self._headers[account.name] + headers + b"X-Request-Id: " + request_id.encode() + b"\r\n"
        return await self.pool.request(b"POST", target, lines, body)

    async def probe(self, account: AccountConfig) -> bool:
        """GET the probe path with the account's credentials only: whether it answers 2xx."""
        try:
            async with asyncio.timeout(self.config.timeouts.first_byte_s):
                response = await self.pool.request(b"GET", self._probe, self._auth[account.name])
                try:
                    while await response.read():
                        pass
                finally:
                    response.close()
                return 200 <= response.status < 300
        except (UpstreamFailure, TimeoutError):
            return False

    async def close(self) -> None:
        await self.pool.close()


def header_value(value: str) -> bytes:
    """`value` as header bytes; a line break in it would start a header of its own."""
    encoded = value.encode()
    if b"\r" in encoded or b"\n" in encoded or b"\0" in encoded:
        raise ValueError("line break in a header value")
    return encoded


def bearer(key: bytes) -> bytes:
    return b"Authorization: Bearer " + key + b"\r\n"
