"""The upstream HTTP/1.1 client against real sockets: a raw asyncio server writes answers byte for
byte as scripted (framings, splits, broken answers, closed connections), and an aiohttp server
serves TLS with a throwaway CA."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.http1 import HIGH_WATER, Pool, UpstreamFailure
from proxy.httpmessage import CHUNKED, LENGTH, UNTIL_CLOSE, chunk_size, framing, parse_head

from .conftest import KEY, closed_port_url, completion_body, make_config

# An answer: the pieces to write (a pause between them, so each arrives on its own), and whether
# to close the connection after them.
Answer = tuple[list[bytes], bool]
Script = Callable[[int, bytes], Answer]  # (request number on the server, request) -> answer


class RawServer:
    """Reads HTTP/1.1 requests (Content-Length bodies) and writes exactly the scripted bytes."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.disconnects = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                pieces, close = self.script(len(self.requests), request)
                for i, piece in enumerate(pieces):
                    if i:
                        await asyncio.sleep(0.002)
                    writer.write(piece)
                    await writer.drain()
                if close:
                    return
        except ConnectionError:
            pass
        finally:
            self.disconnects += 1
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Script], Any]]:
    servers: list[RawServer] = []

    async def start(script: Script) -> RawServer:
        server = RawServer(script)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


def answer(body: bytes = b'{"ok":true}', *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


def chunked(*parts: bytes, trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n" + trailer + b"\r\n"


async def body_of(pool: Pool, method: bytes = b"POST", payload: bytes = b"{}") -> tuple[int, bytes]:
    response = await pool.request(method, pool.target("/chat/completions"), b"X-Test: 1\r\n", payload)
    parts = []
    try:
        while chunk := await response.read():
            parts.append(chunk)
        assert response.finished
        return response.status, b"".join(parts)
    finally:
        response.close()


def pool_for(server: RawServer, **options: Any) -> Pool:
    return Pool(server.url, connect_timeout_s=2, **options)


async def test_tests_run_on_uvloop_like_the_gateway() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


async def test_request_is_one_well_formed_message_and_the_connection_is_reused(raw: Any) -> None:
    server = await raw(lambda n, _: ([answer(b'{"n":%d}' % n)], False))
    pool = pool_for(server)
    assert await body_of(pool, payload=b'{"a":1}') == (200, b'{"n":1}')
    assert await body_of(pool) == (200, b'{"n":2}')
    assert server.connections == 1 and pool.idle == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in first
    assert b"\r\nX-Test: 1\r\nContent-Length: 7\r\n\r\n" in first and first.endswith(b'{"a":1}')
    await pool.close()


async def test_status_and_headers_are_read_case_insensitively(raw: Any) -> None:
    server = await raw(lambda n, _: ([answer(status=b"429 Too Many Requests", extra=b"Retry-After: 7\r\nX-A: 1\r\nx-a: 2\r\n")], False))
    pool = pool_for(server)
    response = await pool.request(b"POST", pool.target("/x"), b"")
    assert response.status == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers.getall("X-A") == ["1", "2"]
    response.close()
    await pool.close()


@pytest.mark.parametrize("split", range(1, len(chunked(b"hello", b" world", trailer=b"X-T: 1\r\n"))))
async def test_chunked_answer_split_anywhere(raw: Any, split: int) -> None:
    whole = chunked(b"hello", b" world", trailer=b"X-T: 1\r\n")
    server = await raw(lambda n, _: ([whole[:split], whole[split:]], False))
    pool = pool_for(server)
    assert await body_of(pool) == (200, b"hello world")
    assert pool.idle == 1  # the answer ended exactly: its connection is reusable
    await pool.close()


async def test_chunk_extensions_and_a_body_arriving_chunk_by_chunk(raw: Any) -> None:
    events = [b"data: %d\n\n" % i for i in range(5)]
    pieces = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"]
    pieces += [b"%x;ext=1\r\n%s\r\n" % (len(event), event) for event in events] + [b"0\r\n\r\n"]
    server = await raw(lambda n, _: (pieces, False))
    pool = pool_for(server)
    response = await pool.request(b"POST", pool.target("/x"), b"")
    got = []
    while chunk := await response.read():
        got.append(chunk)
    response.close()
    assert b"".join(got) == b"".join(events)
    assert len(got) > 1  # relayed as it came, not gathered
    assert pool.idle == 1
    await pool.close()


async def test_body_until_close_is_read_to_the_end_and_not_pooled(raw: Any) -> None:
    server = await raw(lambda n, _: ([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one,", b" part two"], True))
    pool = pool_for(server)
    assert await body_of(pool) == (200, b"part one, part two")
    assert pool.idle == 0
    await pool.close()


@pytest.mark.parametrize(
    ("method", "head"),
    [
        (b"POST", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        (b"POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ],
)
async def test_answers_without_a_body(raw: Any, method: bytes, head: bytes) -> None:
    server = await raw(lambda n, _: ([head], False))
    pool = pool_for(server)
    status, body = await body_of(pool, method)
    assert body == b"" and status in (200, 204)
    assert await body_of(pool, method) == (status, b"")
    assert server.connections == 1
    await pool.close()


async def test_connection_close_and_http10_answers_are_not_pooled(raw: Any) -> None:
    heads = [answer(extra=b"Connection: close\r\n"), answer().replace(b"HTTP/1.1", b"HTTP/1.0")]
    server = await raw(lambda n, _: ([heads[(n - 1) % 2]], False))
    pool = pool_for(server)
    for _ in range(2):
        assert (await body_of(pool))[0] == 200
        assert pool.idle == 0
    assert server.connections == 2
    await pool.close()


@pytest.mark.parametrize(
    ("pieces", "detail"),
    [
        ([b"HTTP/1.1 OK\r\n\r\n"], "bad status line"),
        ([b"SPDY/3 200 OK\r\n\r\n"], "bad status line"),
        ([b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"], "bad header field"),
        ([b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n"], "bad header field"),
        ([b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n"], "bad header field"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"], "bad Content-Length"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"], "bad Content-Length"),
        ([b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 70_000], "answer head over"),
        ([b"HTTP/1.1 200 OK\r\n"], "connection closed before the answer's head"),
    ],
)
async def test_broken_heads_are_bad_responses(raw: Any, pieces: list[bytes], detail: str) -> None:
    server = await raw(lambda n, _: (pieces, True))
    pool = pool_for(server)
    with pytest.raises(UpstreamFailure) as caught:
        await body_of(pool)
    assert caught.value.kind == "bad_response" and detail in caught.value.detail
    await asyncio.sleep(0.01)
    assert pool.connections == 0 and pool.idle == 0
    await pool.close()


@pytest.mark.parametrize(
    ("pieces", "detail"),
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"only ten.."], "body cut"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"], "body cut"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\nhello\r\n0\r\n\r\n"], "bad chunk-size"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"], "not followed by CRLF"),
    ],
)
async def test_broken_bodies_fail_the_read(raw: Any, pieces: list[bytes], detail: str) -> None:
    server = await raw(lambda n, _: (pieces, True))
    pool = pool_for(server)
    response = await pool.request(b"POST", pool.target("/x"), b"")
    assert response.status == 200
    with pytest.raises(UpstreamFailure) as caught:
        while await response.read():
            pass
    response.close()
    assert caught.value.kind == "bad_response" and detail in caught.value.detail
    assert not response.finished and pool.idle == 0
    await pool.close()


async def test_extra_bytes_after_the_body_drop_the_connection(raw: Any) -> None:
    server = await raw(lambda n, _: ([answer(b"abc") + b"garbage"], False))
    pool = pool_for(server)
    assert await body_of(pool) == (200, b"abc")
    assert pool.idle == 0
    await pool.close()


async def test_a_pooled_connection_the_upstream_closed_is_retried_once_on_a_fresh_one(raw: Any) -> None:
    # the second request reaches a kept-alive connection that the server then closes unanswered
    server = await raw(lambda n, _: ([] if n == 2 else [answer(b"%d" % n)], n == 2))
    pool = pool_for(server)
    assert await body_of(pool) == (200, b"1")
    assert await body_of(pool) == (200, b"3")
    assert server.connections == 2 and len(server.requests) == 3


async def test_a_fresh_connection_closed_unanswered_is_a_reset_not_retried(raw: Any) -> None:
    # no byte of an answer: the host's fault, whichever account asked (SPEC §5)
    server = await raw(lambda n, _: ([], True))
    pool = pool_for(server)
    with pytest.raises(UpstreamFailure) as caught:
        await body_of(pool)
    assert caught.value.kind == "reset" and "connection closed before the answer's head" in caught.value.detail
    assert len(server.requests) == 1


async def test_refused_connection_is_a_connect_failure() -> None:
    pool = Pool(closed_port_url(), connect_timeout_s=2)
    with pytest.raises(UpstreamFailure) as caught:
        await body_of(pool)
    assert caught.value.kind == "connect"


async def test_closing_an_unfinished_answer_aborts_its_connection(raw: Any) -> None:
    server = await raw(lambda n, _: ([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nstart"], False))
    pool = pool_for(server)
    response = await pool.request(b"POST", pool.target("/x"), b"")
    assert await response.read() == b"start"
    response.close()
    for _ in range(100):
        if server.disconnects:
            break
        await asyncio.sleep(0.01)
    assert server.disconnects == 1 and pool.connections == 0 and pool.idle == 0


async def test_cancelled_wait_for_the_head_aborts_the_connection(raw: Any) -> None:
    server = await raw(lambda n, _: ([], False) if n == 1 else ([answer()], False))  # never answers the first
    pool = pool_for(server)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await pool.request(b"POST", pool.target("/x"), b"")
    for _ in range(100):
        if server.disconnects:
            break
        await asyncio.sleep(0.01)
    assert server.disconnects == 1 and pool.connections == 0
    assert await body_of(pool) == (200, b'{"ok":true}')  # and the next request gets a new one


async def test_idle_connections_expire_after_keepalive(raw: Any) -> None:
    server = await raw(lambda n, _: ([answer()], False))
    pool = pool_for(server, keepalive_s=0.05)
    await body_of(pool)
    await asyncio.sleep(0.1)
    await body_of(pool)
    assert server.connections == 2
    await pool.close()


async def test_large_body_to_a_slow_reader_arrives_whole_and_buffers_boundedly(raw: Any) -> None:
    big = bytes(range(256)) * 16 * 1024  # 4 MiB
    server = await raw(lambda n, _: ([answer(big)], False))
    pool = pool_for(server)
    response = await pool.request(b"POST", pool.target("/x"), b"")
    await asyncio.sleep(0.2)  # not reading: the socket is paused, the rest waits upstream
    assert 0 < response.buffered <= HIGH_WATER + 256 * 1024  # one socket read past the mark at most
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
        await asyncio.sleep(0.001)
    response.close()
    assert b"".join(parts) == big and pool.idle == 1
    await pool.close()


async def test_large_request_body_is_sent_whole(raw: Any) -> None:
    server = await raw(lambda n, request: ([answer(b"%d" % len(request.partition(b"\r\n\r\n")[2]))], False))
    pool = pool_for(server)
    assert await body_of(pool, payload=b"x" * (3 << 20)) == (200, b"%d" % (3 << 20))
    await pool.close()


async def test_close_aborts_connections_in_use(raw: Any) -> None:
    server = await raw(lambda n, _: ([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"], False))
    pool = pool_for(server)
    response = await pool.request(b"POST", pool.target("/x"), b"")
    await pool.close()
    with pytest.raises(UpstreamFailure):
        await response.read()
    with pytest.raises(UpstreamFailure) as caught:
        await body_of(pool)
    assert caught.value.kind == "connect"


def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    return context


async def test_https_with_a_verified_certificate() -> None:
    ca = trustme.CA()
    server_context = tls_server_context(ca)

    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "host": request.host, "body": (await request.read()).decode()})

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=server_context)
    url = f"https://localhost:{server.port}/v1"
    try:
        trusted = ssl.create_default_context()
        ca.configure_trust(trusted)
        pool = Pool(url, connect_timeout_s=2, ssl_context=trusted)
        status, body = await body_of(pool, payload=b"hi")
        assert status == 200
        assert body == b'{"path": "/v1/chat/completions", "host": "localhost:%d", "body": "hi"}' % server.port
        await pool.close()
        untrusted = Pool(url, connect_timeout_s=2)  # the system's CAs do not know this one
        with pytest.raises(UpstreamFailure) as caught:
            await body_of(untrusted)
        assert caught.value.kind == "connect" and "CERTIFICATE_VERIFY_FAILED" in caught.value.detail
    finally:
        await server.close()


@pytest.mark.parametrize(
    ("line", "size"),
    [(b"0", 0), (b"1a", 26), (b"FF;name=value", 255), (b"10 ", 16), (b"", -1), (b"0x10", -1), (b"-1", -1),
     (b"1_0", -1), (b"+5", -1), (b"1" * 17, -1)],
)
def test_chunk_size(line: bytes, size: int) -> None:
    assert chunk_size(line) == size


def test_parse_head_and_framing() -> None:
    status, minor, headers = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3")
    assert (status, minor) == (200, b"1")
    assert framing(status, headers, False) == (CHUNKED, 0)  # chunked wins over Content-Length
    _, _, headers = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip")
    assert framing(200, headers, False) == (UNTIL_CLOSE, 0)  # not chunked last: until the connection closes
    _, _, headers = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7")
    assert framing(200, headers, False) == (LENGTH, 7)
    assert parse_head(b"HTTP/1.0 404")[0:2] == (404, b"0")


@pytest.mark.parametrize("url", ["ftp://x/v1", "localhost:80", "http:///v1"])
def test_only_http_urls(url: str) -> None:
    with pytest.raises(ValueError):
        Pool(url, connect_timeout_s=1)


async def test_connect_timeout_is_a_connect_failure() -> None:
    # a listener that never accepts, its queue already full: new connections get no answer
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        await asyncio.sleep(0.05)
        pool = Pool(f"http://127.0.0.1:{port}/v1", connect_timeout_s=0.2)
        with pytest.raises(UpstreamFailure) as caught:
            await body_of(pool)
        assert caught.value.kind == "connect" and "connect timeout after 0.2s" in caught.value.detail
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_gateway_serves_from_an_https_upstream_trusted_through_ssl_cert_file(
    start_gateway: Any, http: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    ca = trustme.CA()
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))  # the system store, as an operator points it

    async def handle(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer sk-upstream-0"
        return web.json_response(completion_body("over TLS"))

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=tls_server_context(ca))
    try:
        gateway = await start_gateway(make_config([f"https://localhost:{server.port}/v1"]))
        chat = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {KEY}"}
        async with http.post(f"{gateway.url}/v1/chat/completions", json=chat, headers=headers) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["choices"][0]["message"]["content"] == "over TLS"
    finally:
        await server.close()


async def test_many_concurrent_requests_over_misbehaving_connections_never_mix_answers(raw: Any) -> None:
    """Each request names itself; the server answers it in a way chosen by that name: whole, chunked,
    then closing, followed by bytes it should not send, or broken. Every request gets its own answer or a bad_response, none hangs, and
    no connection is left in use."""
    modes = ["length", "chunked", "close", "overlong", "cut_head", "cut_body", "garbage"]

    def mode_of(ident: int) -> str:
        return modes[ident % len(modes)]

    def script(n: int, request: bytes) -> Answer:
        ident = request.partition(b"\r\n\r\n")[2]
        mode = mode_of(int(ident))
        if mode == "length":
            return [answer(ident)], False
        if mode == "chunked":
            whole = chunked(*([ident[:1], ident[1:]] if len(ident) > 1 else [ident]))
            return [whole[:20], whole[20:]], False
        if mode == "close":
            return [answer(ident, extra=b"Connection: close\r\n")], True
        if mode == "overlong":  # a second answer nobody asked for, as if smuggled: must never be read
            return [answer(ident) + answer(b"smuggled")], False
        if mode == "cut_head":
            return [b"HTTP/1.1 200 OK\r\nContent-"], True
        if mode == "cut_body":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + ident], True
        return [b"HTTP/9 what\r\n\r\n"], True

    server = await raw(script)
    pool = pool_for(server)
    semaphore = asyncio.Semaphore(20)

    async def one(ident: int) -> None:
        async with semaphore:
            try:
                async with asyncio.timeout(5):
                    status, body = await body_of(pool, payload=b"%d" % ident)
            except UpstreamFailure as failure:
                assert mode_of(ident) in ("cut_head", "cut_body", "garbage"), (ident, failure.detail)
                assert failure.kind == "bad_response"
                return
            assert mode_of(ident) in ("length", "chunked", "close", "overlong")
            assert (status, body) == (200, b"%d" % ident)

    await asyncio.gather(*(one(ident) for ident in range(400)))
    await asyncio.sleep(0.05)
    assert pool.connections == pool.idle <= 20
    await pool.close()
