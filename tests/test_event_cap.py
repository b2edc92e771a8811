"""An SSE event over `streaming.MAX_EVENT_BYTES`, through the real gateway: the upstream's fault.

After the stream committed it ends with one error event and no `[DONE]`; before, the request
fails over like any bad answer.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from proxy import streaming

from .conftest import KEY, Handler, Upstream, make_config, sse_chunk, sse_events, stream_handler

ADMIN = "adm-event-cap"
AUTH = {"Authorization": f"Bearer {KEY}"}
STREAM = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "stream": True}
PIECE = 64 * 1024


def over_cap_after(events: list[bytes]) -> Handler:
    """`events`, then one event a MiB past the cap, written in pieces, then the end marker."""

    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        await response.write(b'data: {"choices": [{"index": 0, "delta": {"content": "')
        for _ in range((streaming.MAX_EVENT_BYTES + (1 << 20)) // PIECE):
            await response.write(b"y" * PIECE)
        await response.write(b'"}}]}\n\ndata: [DONE]\n\n')
        await response.write_eof()
        return response

    return handle


async def admin_state(http: Any, url: str) -> dict[str, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(f"{url}/admin/state", headers=headers) as response:
        assert response.status == 200
        accounts = orjson.loads(await response.read())["accounts"]
    return {entry["account"]: entry for entry in accounts}


def events_of(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


async def test_an_over_cap_event_after_commit_ends_the_stream_with_an_error_event(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    upstream.handler = over_cap_after([sse_chunk("first", usage=None)])
    gateway = await start_gateway(make_config([upstream.url], admin_key=ADMIN))
    async with http.post(f"{gateway.url}/v1/chat/completions", json=STREAM, headers=AUTH) as response:
        assert response.status == 200
        body = await response.read()

    events = events_of(body)
    assert len(events) == 2 and b'"first"' in events[0]
    error = orjson.loads(events[1][len(b"data: ") :])["error"]
    assert error["code"] == "bad_upstream_response"
    assert str(streaming.MAX_EVENT_BYTES) in error["message"]
    assert b"data: [DONE]" not in body
    state = (await admin_state(http, gateway.url))["acct0"]
    assert (state["last_error"], state["inflight"]) == ("transient", 0), "the upstream's fault"


async def test_an_over_cap_first_event_fails_over_to_another_account(
    http: Any, make_upstream: Any, start_gateway: Any
) -> None:
    first, second = await make_upstream(), await make_upstream()
    served = {"n": 0}

    async def over_cap_then_fine(request: web.Request) -> web.StreamResponse:
        served["n"] += 1
        if served["n"] == 1:
            return await over_cap_after([])(request)
        return await stream_handler(sse_events(["fine"]))(request)

    first.handler = second.handler = over_cap_then_fine
    gateway = await start_gateway(make_config([first.url, second.url], admin_key=ADMIN))
    async with http.post(f"{gateway.url}/v1/chat/completions", json=STREAM, headers=AUTH) as response:
        assert response.status == 200
        body = await response.read()

    assert b'"fine"' in body and body.endswith(b"data: [DONE]\n\n")
    assert b"yyyy" not in body
    state = await admin_state(http, gateway.url)
    assert sorted(entry["last_error"] or "" for entry in state.values()) == ["", "transient"]

