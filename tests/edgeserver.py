"""A gateway on a real port served as `llm-proxy serve` serves it, and raw HTTP/1.1 over sockets.

`start_edge_gateway` runs `build_app` through `proxy.edge.GatewayRunner` (as conftest's
`start_gateway` now does too); `exchange` sends bytes no HTTP client would send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.app import build_app
from proxy.config import Config

from .conftest import EdgeTestServer, Gateway


@pytest.fixture
async def start_edge_gateway() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    servers: list[EdgeTestServer] = []

    async def start(config: Config, **options: Any) -> Gateway:
        server = EdgeTestServer(build_app(config, **options))
        await server.start_server()
        servers.append(server)
        return Gateway(server)

    yield start
    for server in servers:
        await server.close()


class Answer:
    """One HTTP answer read off a socket: status, headers (lower-case names), body."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return Answer(status, headers, body)


async def exchange(port: int, request: bytes, *, half_close: bool = False) -> Answer:
    """Sends `request` as it is on a new connection and reads the first answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        if half_close:
            writer.write_eof()
        return await read_answer(reader)
    finally:
        writer.close()
