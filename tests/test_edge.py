"""The HTTP edge: connection lifetimes, malformed requests, unknown routes and methods, prefixes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from proxy.config import ModelConfig, Target

from .conftest import KEY, OTHER_KEY, Gateway, make_config
from . import edgeserver
from .edgeserver import exchange, read_answer

start_edge_gateway = edgeserver.start_edge_gateway  # the fixture, under its name here

AUTH = {"Authorization": f"Bearer {KEY}"}
GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n"

Starter = Callable[..., Awaitable[Gateway]]


@pytest.fixture(params=["aiohttp-runner", "gateway-runner"])
def either_gateway(request: pytest.FixtureRequest, start_gateway: Starter, start_edge_gateway: Starter) -> Starter:
    """The suite's gateway (aiohttp's own runner) and the one `serve` runs: both must hold."""
    return start_gateway if request.param == "aiohttp-runner" else start_edge_gateway


def assert_openai_error(body: bytes, code: str) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


async def eof_of(reader: asyncio.StreamReader, within_s: float = 15.0) -> bytes:
    """What the server sent before it closed the connection; TimeoutError if it did not."""
    async with asyncio.timeout(within_s):
        return await reader.read()


async def trickle(writer: asyncio.StreamWriter, data: bytes, gap_s: float) -> None:
    """A slowloris client: one byte at a time, never finishing."""
    try:
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(gap_s)
    except ConnectionError:
        pass  # the server closed the connection: what the test waits for


async def test_a_trickled_request_head_is_closed_after_header_timeout(start_edge_gateway: Any) -> None:
    gateway = await start_edge_gateway(make_config(header_timeout_s=0.5, keepalive_s=60))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    slow = asyncio.create_task(trickle(writer, b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: a\r\n" * 100, 0.05))
    try:
        assert await eof_of(reader) == b"", "closed without an answer, long before keepalive_s"
    finally:
        slow.cancel()
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(start_edge_gateway: Any) -> None:
    gateway = await start_edge_gateway(make_config(header_timeout_s=0.5, keepalive_s=60))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        assert await eof_of(reader) == b""
    finally:
        writer.close()


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_s(either_gateway: Starter) -> None:
    gateway = await either_gateway(make_config(keepalive_s=0.5, header_timeout_s=10))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        for _ in range(2):  # the connection is kept alive between requests ...
            writer.write(GET_HEALTHZ)
            answer = await read_answer(reader)
            assert answer.status == 200 and answer.headers.get("connection") != "close"
        assert await eof_of(reader) == b"", "... and closed once idle for keepalive_s"
    finally:
        writer.close()


async def test_the_next_request_head_on_a_kept_alive_connection_is_due_within_keepalive_s(
    start_edge_gateway: Any,
) -> None:
    gateway = await start_edge_gateway(make_config(keepalive_s=0.5, header_timeout_s=10))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    writer.write(GET_HEALTHZ)
    assert (await read_answer(reader)).status == 200
    slow = asyncio.create_task(trickle(writer, b"GET /healthz HTTP/1.1\r\n" + b"X-Pad: a\r\n" * 100, 0.05))
    try:
        assert await eof_of(reader) == b""
    finally:
        slow.cancel()
        writer.close()


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/api/v2/models"), ("GET", "/v1/chat/completions/x"),
     ("PUT", "/")],
)
async def test_an_unknown_route_is_an_openai_404_with_a_request_id(
    http: Any, start_gateway: Any, method: str, path: str
) -> None:
    gateway = await start_gateway(make_config())
    async with http.request(method, f"{gateway.url}{path}", headers={"X-Request-Id": "mine-7"}) as response:
        assert response.status == 404
        assert response.headers["x-request-id"] == "mine-7"
        assert response.content_type == "application/json"
        error = assert_openai_error(await response.read(), "unknown_route")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/chat/completions", {"POST"}),
        ("PUT", "/api/client/v1/chat/completions", {"POST"}),
        ("POST", "/v1/models", {"GET", "HEAD"}),
        ("DELETE", "/api/v1/models/gpt-test", {"GET", "HEAD"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("OPTIONS", "/metrics", {"GET", "HEAD"}),
    ],
)
async def test_a_wrong_method_is_an_openai_405_with_allow(
    http: Any, start_gateway: Any, method: str, path: str, allowed: set[str]
) -> None:
    gateway = await start_gateway(make_config())
    async with http.request(method, f"{gateway.url}{path}", headers=AUTH) as response:
        assert response.status == 405
        assert "x-request-id" in response.headers
        assert {m.strip() for m in response.headers["Allow"].split(",")} == allowed
        assert_openai_error(await response.read(), "method_not_allowed")


@pytest.mark.parametrize("prefix", ["", "/api", "/api/client"])
async def test_models_are_listed_and_read_under_every_prefix(http: Any, start_gateway: Any, prefix: str) -> None:
    models = {
        "gpt-test": ModelConfig(name="gpt-test", targets=(Target(provider="mock", model="m"),)),
        "org/same-name": ModelConfig(name="org/same-name", targets=(Target(provider="mock", model="m"),)),
    }
    gateway = await start_gateway(make_config(models=models))
    async with http.get(f"{gateway.url}{prefix}/v1/models", headers=AUTH) as response:
        assert response.status == 200
        assert [m["id"] for m in (await response.json())["data"]] == ["gpt-test", "org/same-name"]
    async with http.get(f"{gateway.url}{prefix}/v1/models/org/same-name", headers=AUTH) as response:
        assert response.status == 200 and "x-request-id" in response.headers
        model = await response.json()
    assert (model["id"], model["object"], model["owned_by"]) == ("org/same-name", "model", "mock")
    assert set(model) == {"id", "object", "created", "owned_by"}
    async with http.get(f"{gateway.url}{prefix}/v1/models/nope", headers=AUTH) as response:
        assert response.status == 404
        assert_openai_error(await response.read(), "model_not_found")
    async with http.get(f"{gateway.url}{prefix}/v1/models/gpt-test") as response:
        assert response.status == 401


async def test_a_model_the_key_may_not_use_is_not_found(http: Any, start_gateway: Any) -> None:
    gateway = await start_gateway(make_config())
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}  # team-b may use only `same-name`
    async with http.get(f"{gateway.url}/v1/models/gpt-test", headers=headers) as response:
        assert response.status == 404
        assert_openai_error(await response.read(), "model_not_found")
    async with http.get(f"{gateway.url}/v1/models/same-name", headers=headers) as response:
        assert response.status == 200


async def test_the_openai_sdk_reads_one_model(start_gateway: Any) -> None:
    gateway = await start_gateway(make_config())
    model = await gateway.client().models.retrieve("gpt-test")
    assert model.id == "gpt-test" and model.object == "model"


MALFORMED = [
    pytest.param(b"GET /v1/models HTTP/1.1\nHost: gw\nAuthorization: Bearer %s\n\n", id="bare-lf"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\x01\r\n\r\n", id="control-char"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: %s\x7f\r\n\r\n", id="del-in-x-api-key"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: %s\r\nBad Header: 1\r\n\r\n", id="space-in-name"),
    pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", id="two-lengths"),
    pytest.param(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nX-Long: " + b"a" * 9000 + b"%s\r\n\r\n", id="header-too-long"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03%s", id="tls-hello"),
]


@pytest.mark.parametrize("raw", MALFORMED)
async def test_a_malformed_request_gets_an_openai_400_with_a_request_id(start_edge_gateway: Any, raw: bytes) -> None:
    gateway = await start_edge_gateway(make_config())
    answer = await exchange(gateway.server.port, raw % KEY.encode())
    assert answer.status == 400
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["x-request-id"].startswith("req_")
    error = assert_openai_error(answer.body, "malformed_request")
    assert error["type"] == "invalid_request_error"
    assert KEY.encode() not in answer.body, "the answer does not quote the request back"


async def test_no_key_reaches_the_log_from_a_malformed_request(
    either_gateway: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await either_gateway(make_config())
    caplog.set_level(logging.DEBUG)
    for raw in MALFORMED:
        await exchange(gateway.server.port, raw.values[0] % KEY.encode())
    logged = caplog.text + "".join(str(record.__dict__) for record in caplog.records)
    assert KEY not in logged
    assert "malformed request" in caplog.text, "a short line still says what was refused"


@pytest.mark.parametrize(
    "path",
    [b"/v1/models/%ff", b"/%ff%fe", b"/v1/models/\xff", b"/\xc3\x28", b"/v1/models/" + b"a" * 5000,
     b"/v1/models/%00", b"/api/client/v1/models/%2e%2e%2f"],
)
async def test_odd_paths_get_json_answers_not_500(start_edge_gateway: Any, path: bytes) -> None:
    gateway = await start_edge_gateway(make_config())
    raw = b"GET " + path + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
    answer = await exchange(gateway.server.port, raw)
    assert answer.status in (400, 404), answer.body
    assert answer.headers["content-type"].startswith("application/json")
    assert "x-request-id" in answer.headers
    orjson.loads(answer.body)


async def test_metrics_carry_a_request_id(http: Any, start_gateway: Any) -> None:
    gateway = await start_gateway(make_config())
    async with http.get(f"{gateway.url}/metrics", headers={"X-Request-Id": "scrape-1"}) as response:
        assert response.status == 200 and response.headers["x-request-id"] == "scrape-1"


def post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_body_that_pauses_past_body_timeout_gets_408(either_gateway: Starter, path: str) -> None:
    """A client that stops sending its body holds nothing for ever: 408 `request_timeout`."""
    gateway = await either_gateway(make_config(body_timeout_s=0.3))
    body = orjson.dumps({"model": "gpt-test", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        writer.write(post_head(path, len(body)) + body[:10])  # the rest never comes
        async with asyncio.timeout(15):
            answer = await read_answer(reader)
        assert answer.status == 408 and answer.headers["x-request-id"].startswith("req_")
        error = orjson.loads(answer.body)
        if path == "/v1/messages":  # Anthropic's shape
            assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
        else:
            assert assert_openai_error(answer.body, "request_timeout")["type"] == "invalid_request_error"
    finally:
        writer.close()


async def test_a_chunked_body_still_arriving_is_refused_once_over_max_body_bytes(either_gateway: Starter) -> None:
    gateway = await either_gateway(make_config(max_body_bytes=1000, body_timeout_s=5))
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    try:
        writer.write(head + b"258\r\n" + b"x" * 600 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # a second piece, after the handler started reading
        writer.write(b"258\r\n" + b"x" * 600 + b"\r\n")
        async with asyncio.timeout(15):
            answer = await read_answer(reader)
        assert answer.status == 413
        assert_openai_error(answer.body, "request_too_large")
    finally:
        writer.close()


async def test_a_body_sent_in_pieces_within_body_timeout_is_served(either_gateway: Starter) -> None:
    gateway = await either_gateway(make_config(body_timeout_s=5))
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hello " * 200}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.server.port)
    try:
        writer.write(post_head("/v1/chat/completions", len(body)))
        for start in range(0, len(body), 300):  # a slow link: pieces well within the timeout
            writer.write(body[start : start + 300])
            await writer.drain()
            await asyncio.sleep(0.02)
        async with asyncio.timeout(15):
            answer = await read_answer(reader)
        assert answer.status == 200, answer.body[:200]
        assert orjson.loads(answer.body)["choices"][0]["message"]["content"].split()[:2] == ["hello", "hello"]
    finally:
        writer.close()
