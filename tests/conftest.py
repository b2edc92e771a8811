"""Shared fixtures: scripted real upstream servers, a gateway on a real port, the openai SDK."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import MappingProxyType
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import uvloop
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.accesslog import AccessLog
from proxy.app import build_app
from proxy.edge import GatewayRunner
from proxy.config import (
    AccountConfig,
    Config,
    KeyConfig,
    LoggingConfig,
    ModelConfig,
    ProviderConfig,
    RoutingConfig,
    ServerConfig,
    Target,
    Timeouts,
)

from .processes import serve  # noqa: F401  (fixture: real gateway processes)
from .redisproc import redis_server  # noqa: F401  (fixture: a real redis-server)

KEY = "sk-test-team-a"
OTHER_KEY = "sk-test-team-b"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every test runs on uvloop, the loop the gateway serves on."""
    return {"uvloop": uvloop.new_event_loop}


class Upstream:
    """A real aiohttp server standing in for a provider; `handler` decides each answer."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.handler: Handler = completion_handler()
        self.server: TestServer | None = None
        self.cancelled = 0

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/v1"))

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"path": request.path, "headers": {k.lower(): v for k, v in request.headers.items()}, "body": body})
        try:
            return await self.handler(request)
        except BaseException:
            self.cancelled += 1
            raise


def completion_body(content: str = "Hello there", usage: tuple[int, int] = (5, 2)) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "upstream-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def completion_handler(status: int = 200, body: bytes | None = None) -> Handler:
    payload = body if body is not None else orjson.dumps(completion_body())

    async def handle(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=payload, content_type="application/json")

    return handle


def sse_chunk(content: str | None = None, *, finish: str | None = None, usage: Any = ...) -> bytes:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "upstream-model",
        "choices": [] if content is None and finish is None else [
            {"index": 0, "delta": {} if content is None else {"content": content}, "finish_reason": finish}
        ],
    }
    if usage is not ...:
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def sse_events(words: list[str], usage: tuple[int, int] = (7, 3)) -> list[bytes]:
    """A stream as OpenAI sends it when usage was asked for: usage:null, usage chunk, [DONE]."""
    events = [sse_chunk(w, usage=None) for w in words]
    events.append(sse_chunk(finish="stop", usage=None))
    events.append(sse_chunk(usage={"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}))
    events.append(b"data: [DONE]\n\n")
    return events


def stream_handler(events: list[bytes], *, gap_s: float = 0.0, status: int = 200) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            if gap_s:
                await asyncio.sleep(gap_s)
        await response.write_eof()
        return response

    return handle


def hang() -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    return handle


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def make_config(
    upstream_urls: list[str] | None = None,
    *,
    timeouts: Timeouts = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=20),
    models: dict[str, ModelConfig] | None = None,
    max_attempts: int = 3,
    **server: Any,
) -> Config:
    """One `openai` provider named `up` with an account per upstream URL... or one mock provider."""
    providers: dict[str, ProviderConfig] = {}
    if upstream_urls:
        for i, url in enumerate(upstream_urls):
            providers[f"up{i}"] = ProviderConfig(
                name=f"up{i}",
                type="openai",
                base_url=url,
                timeouts=timeouts,
                accounts=(AccountConfig(name=f"acct{i}", api_key=f"sk-upstream-{i}"),),
            )
    else:
        providers["mock"] = ProviderConfig(name="mock", type="mock", accounts=(AccountConfig(name="mock"),))
    names = list(providers)
    if models is None:
        models = {
            "gpt-test": ModelConfig(
                name="gpt-test", targets=tuple(Target(provider=p, model="upstream-model") for p in names)
            ),
            "same-name": ModelConfig(
                name="same-name", targets=tuple(Target(provider=p, model="same-name") for p in names)
            ),
            "embed": ModelConfig(name="embed", kind="embedding", targets=(Target(provider=names[0], model="e"),)),
        }
    keys = (
        KeyConfig(name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest()),
        KeyConfig(
            name="team-b",
            key_sha256=hashlib.sha256(OTHER_KEY.encode()).hexdigest(),
            models=frozenset({"same-name"}),
        ),
    )
    return Config(
        server=ServerConfig(**server),
        keys=keys,
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        routing=RoutingConfig(max_attempts=max_attempts),
        logging=LoggingConfig(access_log=False),
    )


@pytest.fixture
async def make_upstream(aiohttp_server: Any) -> Callable[[], Awaitable[Upstream]]:
    async def make() -> Upstream:
        upstream = Upstream()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", upstream._dispatch)
        upstream.server = await aiohttp_server(app)
        return upstream

    return make


@pytest.fixture
async def upstream(make_upstream: Callable[[], Awaitable[Upstream]]) -> Upstream:
    return await make_upstream()


class Gateway:
    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.clients: list[openai.AsyncOpenAI] = []

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    def client(self, key: str = KEY) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=20)
        self.clients.append(client)
        return client


class EdgeTestServer(TestServer):
    """The app served as `llm-proxy serve` serves it: through `proxy.edge.GatewayRunner`."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return GatewayRunner(self.app, **kwargs)


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Awaitable[Gateway]]]:
    started: list[Gateway] = []

    async def start(config: Config, **options: Any) -> Gateway:
        server = EdgeTestServer(build_app(config, **options))
        await server.start_server()
        gateway = Gateway(server)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        for client in gateway.clients:
            await client.close()
        await gateway.server.close()


@pytest.fixture
async def gateway(start_gateway: Callable[[Config], Awaitable[Gateway]], upstream: Upstream) -> Gateway:
    return await start_gateway(make_config([upstream.url]))


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def log_lines() -> AsyncIterator[tuple[AccessLog, asyncio.StreamReader]]:
    """A real access log writing into a pipe, and the pipe's other end to read its lines."""
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader()
    transport, _ = await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
    )
    yield AccessLog(fd=write_fd, interval_s=0), reader
    transport.close()
    os.close(write_fd)
