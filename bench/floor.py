"""The floor: about the least a Python gateway can do per request, to measure llm-proxy against.

aiohttp + uvloop + orjson: parse the body once, forward its bytes on one keep-alive session
to `--upstream` + the request path, return the JSON, relay a stream chunk by chunk. No auth,
no validation, no failover, no logs.   python -m bench.floor --port 8001 --upstream URL

`--client http1` forwards with llm-proxy's own HTTP/1.1 client (`proxy.http1`) instead of
aiohttp's: the same least work on the client llm-proxy uses, to tell what its features cost from
what its client saves.
"""

import argparse

import aiohttp
import orjson
import uvloop
from aiohttp import web

from proxy.http1 import Pool

SESSION = web.AppKey("session", aiohttp.ClientSession)
POOL = web.AppKey("pool", Pool)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"}
HEADER_LINES = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in HEADERS.items())


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    stream = orjson.loads(body).get("stream") is True
    url = request.app[UPSTREAM] + request.path
    async with request.app[SESSION].post(url, data=body, headers=HEADERS) as upstream:
        if not stream:
            return web.Response(body=await upstream.read(), status=upstream.status,
                                content_type="application/json")
        response = web.StreamResponse(status=upstream.status,
                                      headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def relay_http1(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    stream = orjson.loads(body).get("stream") is True
    pool = request.app[POOL]
    upstream = await pool.request(b"POST", request.path.encode(), HEADER_LINES, body)
    try:
        if not stream:
            parts = [chunk async for chunk in _chunks(upstream)]
            return web.Response(body=b"".join(parts), status=upstream.status, content_type="application/json")
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        async for chunk in _chunks(upstream):
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        upstream.close()


async def _chunks(upstream):  # type: ignore[no-untyped-def]
    while chunk := await upstream.read():
        yield chunk


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--client", choices=("aiohttp", "http1"), default="aiohttp")
    args = parser.parse_args()
    app = web.Application(client_max_size=64 << 20)
    app[UPSTREAM] = args.upstream.rstrip("/")
    if args.client == "http1":
        app[POOL] = Pool(app[UPSTREAM], connect_timeout_s=5)
        app.router.add_post("/{tail:.*}", relay_http1)
    else:
        app.cleanup_ctx.append(session_ctx)
        app.router.add_post("/{tail:.*}", relay)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
