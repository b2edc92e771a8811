"""The terminal stage against real upstream servers: relay, failover, timeouts, streams."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from aiohttp import web

from proxy.config import Timeouts

from .conftest import (
    KEY,
    closed_port_url,
    hang,
    Upstream,
    completion_handler,
    make_config,
    sse_chunk,
    sse_events,
    stream_handler,
)

AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**GOOD, "stream": True}
FAST = Timeouts(connect_s=1, first_byte_s=0.3, idle_s=0.3, total_s=5)


async def post(http: Any, url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=AUTH) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


def events_of(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


async def two_upstreams(make_upstream: Any, start_gateway: Any, **kw: Any) -> tuple[Upstream, Upstream, Any]:
    first, second = await make_upstream(), await make_upstream()
    gateway = await start_gateway(make_config([first.url, second.url], **kw))
    return first, second, gateway


@pytest.mark.parametrize("status", [400, 404, 413, 422])
async def test_caller_faults_are_relayed_unchanged_without_retry(
    http: Any, make_upstream: Any, start_gateway: Any, status: int
) -> None:
    first, second, gateway = await two_upstreams(make_upstream, start_gateway)
    for upstream in (first, second):
        upstream.handler = completion_handler(status, b"plain words, not OpenAI's shape")
    got, headers, body = await post(http, gateway.url, GOOD)
    assert (got, body) == (status, b"plain words, not OpenAI's shape")
    assert headers["x-request-id"]
    assert len(first.requests) + len(second.requests) == 1


@pytest.mark.parametrize("status", [500, 503, 529, 405])
async def test_transient_fault_fails_over_to_another_account(
    http: Any, make_upstream: Any, start_gateway: Any, status: int
) -> None:
    first, second, gateway = await two_upstreams(make_upstream, start_gateway)
    first.handler = completion_handler(status, b'{"error": "boom"}')
    for _ in range(4):
        got, _, body = await post(http, gateway.url, GOOD)
        assert got == 200, body
        assert orjson.loads(body)["choices"][0]["message"]["content"] == "Hello there"


async def test_every_attempt_failing_reports_the_last_one(http: Any, make_upstream: Any, start_gateway: Any) -> None:
    first, second, gateway = await two_upstreams(make_upstream, start_gateway)
    first.handler = completion_handler(500, b"{}")
    second.handler = completion_handler(502, b"{}")
    got, _, body = await post(http, gateway.url, GOOD)
    assert got == 502
    assert orjson.loads(body)["error"]["code"] == "bad_upstream_response"
    assert len(first.requests) == len(second.requests) == 1


async def test_connect_refused_is_502_unreachable(http: Any, start_gateway: Any) -> None:
    gateway = await start_gateway(make_config([closed_port_url()], timeouts=FAST))
    got, _, body = await post(http, gateway.url, GOOD)
    assert got == 502
    assert orjson.loads(body)["error"] == {
        "message": "Could not connect to the upstream provider.",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_unreachable",
    }


async def test_no_first_byte_is_504_and_upstream_is_abandoned(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = hang()
    gateway = await start_gateway(make_config([upstream.url], timeouts=FAST))
    got, _, body = await post(http, gateway.url, GOOD)
    assert got == 504
    assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
    await wait_for(lambda: upstream.cancelled == 1)


async def test_account_fault_is_503_no_account_available(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = completion_handler(401, b'{"error": {"message": "bad key"}}')
    gateway = await start_gateway(make_config([upstream.url]))
    got, headers, body = await post(http, gateway.url, GOOD)
    assert got == 503
    assert orjson.loads(body)["error"]["code"] == "no_account_available"
    assert int(headers["retry-after"]) >= 1


async def test_garbage_answer_is_502(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = completion_handler(200, b"<html>oops</html>")
    gateway = await start_gateway(make_config([upstream.url]))
    got, _, body = await post(http, gateway.url, GOOD)
    assert got == 502
    assert orjson.loads(body)["error"]["code"] == "bad_upstream_response"


async def test_stream_relays_events_in_order_with_usage_stripped(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    events = sse_events(["a", "b", "c"])
    upstream.handler = stream_handler(events)
    gateway = await start_gateway(make_config([upstream.url]))
    got, headers, body = await post(http, gateway.url, STREAM)
    assert got == 200
    assert headers["content-type"] == "text/event-stream"
    expected = [e.rstrip(b"\n") for e in events if b'"choices":[]' not in e]
    assert events_of(body) == expected


async def test_stream_events_split_across_reads_and_crlf(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    raw = b"".join(sse_events(["x", "y"])).replace(b"\n\n", b"\r\n\r\n")
    pieces = [raw[i : i + 7] for i in range(0, len(raw), 7)]
    upstream.handler = stream_handler(pieces, gap_s=0.001)
    gateway = await start_gateway(make_config([upstream.url]))
    got, _, body = await post(http, gateway.url, {**STREAM, "stream_options": {"include_usage": True}})
    assert got == 200
    assert body == raw


async def test_event_larger_than_512_kib_passes_intact(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    big = "z" * (700 * 1024)
    events = sse_events([big, "end"])
    upstream.handler = stream_handler(events)
    gateway = await start_gateway(make_config([upstream.url]))
    got, _, body = await post(http, gateway.url, STREAM)
    assert got == 200
    first = orjson.loads(events_of(body)[0][len(b"data: ") :])
    assert first["choices"][0]["delta"]["content"] == big


async def test_stream_cut_after_commit_ends_with_one_error_event(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = stream_handler([sse_chunk("partial", usage=None)])
    gateway = await start_gateway(make_config([upstream.url]))
    got, _, body = await post(http, gateway.url, STREAM)
    assert got == 200
    events = events_of(body)
    assert len(events) == 2
    assert orjson.loads(events[-1][len(b"data: ") :])["error"]["code"] == "bad_upstream_response"
    assert b"data: [DONE]" not in body
    assert len(upstream.requests) == 1, "no retry once the client has bytes"


async def test_stream_idle_after_commit_ends_with_timeout_event(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse_chunk("one", usage=None))
        await asyncio.sleep(30)
        return response

    upstream.handler = stall
    gateway = await start_gateway(make_config([upstream.url], timeouts=FAST))
    got, _, body = await post(http, gateway.url, STREAM)
    events = events_of(body)
    assert got == 200 and len(events) == 2
    assert orjson.loads(events[-1][len(b"data: ") :])["error"]["code"] == "upstream_timeout"
    await wait_for(lambda: upstream.cancelled == 1)


async def test_stream_fails_over_before_its_first_event(http: Any, make_upstream: Any, start_gateway: Any) -> None:
    first, second, gateway = await two_upstreams(make_upstream, start_gateway)
    first.handler = second.handler = stream_handler(sse_events(["ok"]))
    # whichever account is picked first breaks: 500, then a stream that ends before any event
    broken = {"n": 0}

    async def flaky(request: web.Request) -> web.StreamResponse:
        broken["n"] += 1
        if broken["n"] == 1:
            return web.Response(status=500)
        return await stream_handler(sse_events(["ok"]))(request)

    first.handler = second.handler = flaky
    got, _, body = await post(http, gateway.url, STREAM)
    assert got == 200
    assert b"data: [DONE]" in body and b'"ok"' in body


async def test_client_disconnect_cancels_upstream_within_a_second(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = stream_handler(sse_events(["w"] * 200), gap_s=0.05)
    gateway = await start_gateway(make_config([upstream.url]))
    response = await http.post(f"{gateway.url}/v1/chat/completions", json=STREAM, headers=AUTH)
    assert response.status == 200
    await response.content.readuntil(b"\n\n")
    response.close()
    await wait_for(lambda: upstream.cancelled == 1, timeout_s=1.0)


async def test_upstream_model_name_is_rewritten_and_nothing_else(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    gateway = await start_gateway(make_config([upstream.url]))
    body = {**GOOD, "temperature": 0.5, "top_k": 3}
    got, _, _ = await post(http, gateway.url, body)
    assert got == 200
    assert orjson.loads(upstream.requests[0]["body"]) == {**body, "model": "upstream-model"}


async def wait_for(predicate: Any, timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_stream_longer_than_idle_s_with_short_gaps_completes(http: Any, upstream: Upstream, start_gateway: Any) -> None:
    # idle_s 0.3 with chunks 0.1 s apart for ~1.2 s: the idle timer fires early several times
    # and must be set again rather than end the stream
    upstream.handler = stream_handler(sse_events(["t"] * 10), gap_s=0.1)
    gateway = await start_gateway(make_config([upstream.url], timeouts=FAST))
    got, _, body = await post(http, gateway.url, STREAM)
    assert got == 200
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
