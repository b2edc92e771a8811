"""A client that reads a stream slowly, through the real gateway on real sockets.

Waiting for the client is not upstream idleness: a client that pauses longer than the upstream's
`idle_s` still gets its whole stream, and one that stops taking bytes is dropped after
`Clock.client_stall_s`, with its upstream exchange closed and nothing held.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.accesslog import AccessLog
from proxy.config import Timeouts
from proxy.clock import Clock

from .conftest import KEY, Upstream, make_config, sse_chunk, stream_handler

FAST = Timeouts(connect_s=1, first_byte_s=2, idle_s=0.3, total_s=40)
ADMIN = "adm-slow-client"
STREAM = orjson.dumps(
    {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
)
EVENT_TEXT = 16 * 1024
# 16 MiB: far more than the client-side path can hold (the gateway's send buffer tops out at
# net.ipv4.tcp_wmem's 4 MiB, the client's receive buffer is pinned small), so the gateway
# must wait for this client to read
EVENTS = 1024
PAUSE_S = 5 * FAST.idle_s
STALL_S = 1.0  # the stall limit for these tests: well past idle_s, well under the test timeout


def numbered_event(i: int) -> bytes:
    return sse_chunk(f"{i:06d}" + "z" * (EVENT_TEXT - 6), usage=None)


def endless_stream() -> Any:
    """Events for as long as the connection takes them."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        i = 0
        while True:
            await response.write(numbered_event(i))
            i += 1

    return handle


class RawClient:
    """An HTTP/1.1 client on a socket with a small, fixed receive buffer, read chunk by chunk."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def post(cls, host: str, port: int, body: bytes) -> RawClient:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)  # also stops autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        client = cls(reader, writer)
        head_bytes = await reader.readuntil(b"\r\n\r\n")
        assert head_bytes.startswith(b"HTTP/1.1 200"), head_bytes
        assert b"transfer-encoding: chunked" in head_bytes.lower()
        return client

    async def chunk(self) -> bytes:
        """The next chunk of the body; b"" at its last chunk."""
        size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            assert await self.reader.readuntil(b"\r\n") == b"\r\n"
            return b""
        data = await self.reader.readexactly(size)
        assert await self.reader.readexactly(2) == b"\r\n"
        return data

    async def until(self, marker: bytes) -> bytes:
        body = b""
        while marker not in body:
            body += await self.chunk()
        return body

    async def rest(self) -> bytes:
        body = b""
        while data := await self.chunk():
            body += data
        return body

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionResetError:
            pass  # the gateway dropped it first


async def admin_state(http: Any, url: str) -> dict[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(f"{url}/admin/state", headers=headers) as response:
        assert response.status == 200
        accounts = orjson.loads(await response.read())["accounts"]
    return {entry["account"]: entry for entry in accounts}


async def wait_for(predicate: Any, timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)



async def test_a_client_pausing_longer_than_idle_s_still_gets_the_whole_stream(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    events = [numbered_event(i) for i in range(EVENTS)] + [b"data: [DONE]\n\n"]
    upstream.handler = stream_handler(events)
    gateway = await start_gateway(make_config([upstream.url], timeouts=FAST, admin_key=ADMIN))
    client = await RawClient.post(gateway.server.host, gateway.server.port, STREAM)
    try:
        body = await client.until(b"\n\n")
        await asyncio.sleep(PAUSE_S)  # the behaviour under test: a client that reads nothing a while
        body += await client.rest()
    finally:
        await client.close()

    assert body == b"".join(events), "every event in order, [DONE] last, no error event"
    assert upstream.cancelled == 0
    assert (await admin_state(http, gateway.url))["acct0"]["inflight"] == 0


async def test_a_client_that_stops_reading_is_dropped_after_the_stall_limit(
    http: Any,
    upstream: Upstream,
    start_gateway: Any,
    log_lines: tuple[AccessLog, asyncio.StreamReader],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Clock, "client_stall_s", STALL_S)
    access_log, log = log_lines
    upstream.handler = endless_stream()
    gateway = await start_gateway(
        make_config([upstream.url], timeouts=FAST, admin_key=ADMIN), access_log=access_log
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    client = await RawClient.post(gateway.server.host, gateway.server.port, STREAM)
    try:
        await client.until(b"\n\n")  # then never reads again
        async with asyncio.timeout(STALL_S + 20):
            record = orjson.loads(await log.readline())
        ended = loop.time()
        await wait_for(lambda: upstream.cancelled == 1, timeout_s=10)
        server = gateway.server.runner.server
        await wait_for(lambda: not server.connections, timeout_s=10)  # the client's connection too
        rest = b""
        try:
            while data := await client.reader.read(1 << 16):
                rest += data
        except ConnectionResetError:
            pass  # dropped with what the client had not taken
    finally:
        await client.close()

    assert (record["status"], record["error_type"]) == (408, "client_timeout")
    assert ended - started >= STALL_S, "waiting on the client is not upstream idleness"
    assert b"[DONE]" not in rest
    assert (await admin_state(http, gateway.url))["acct0"]["inflight"] == 0
