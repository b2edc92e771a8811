"""The floor: about the least a Python gateway can do per request, to measure llm-proxy against.

aiohttp + uvloop + orjson: parse the body once, forward its bytes on one keep-alive session
to `--upstream` + the request path, return the JSON, relay a stream chunk by chunk. No auth,
no validation, no failover, no logs.   python -m bench.floor --port 8001 --upstream URL
"""

import argparse

import aiohttp
import orjson
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream"}


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


async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 << 20)
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", relay)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
