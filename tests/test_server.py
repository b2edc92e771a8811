"""The real process: `llm-proxy serve` on the mock provider, its access log, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from .processes import KEY, free_port, render


def chat(stream: bool) -> dict[str, Any]:
    return {"model": "demo-chat", "stream": stream, "messages": [{"role": "user", "content": "one two three four five"}]}


HEADERS = {"Authorization": f"Bearer {KEY}"}


async def test_access_log_has_one_line_per_request_without_secrets(serve: Any) -> None:
    process = await serve()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{process.url}/v1/chat/completions", json=chat(False), headers=HEADERS) as r:
            assert r.status == 200
            assert (await r.json())["choices"][0]["message"]["content"] == "one two three four five"
        async with http.post(f"{process.url}/v1/chat/completions", json=chat(True), headers=HEADERS) as r:
            assert r.status == 200
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        async with http.post(f"{process.url}/v1/chat/completions", json=chat(False)) as r:
            assert r.status == 401
    assert await process.stop() == 0
    lines = [orjson.loads(line) for line in process.stdout.splitlines()]
    assert [(line["status"], line["stream"]) for line in lines] == [(200, False), (200, True), (401, False)]
    fields = {"time", "request_id", "key", "model", "provider", "account", "attempts", "status",
              "error_type", "prompt_tokens", "completion_tokens", "ttft_ms", "duration_ms", "stream"}
    assert all(set(line) == fields for line in lines)
    assert lines[0]["key"] == "tester" and lines[0]["completion_tokens"] == 5
    assert lines[1]["completion_tokens"] == 5, "usage of a stream is read from its usage chunk"
    assert lines[2]["error_type"] == "invalid_api_key"
    assert KEY.encode() not in process.stdout and b"three" not in process.stdout


async def test_sigterm_drains_in_flight_streams_then_exits_zero(serve: Any) -> None:
    process = await serve(drain_delay_s=0.6, chunk_delay_ms=150)
    async with aiohttp.ClientSession() as http:
        in_flight = await http.post(f"{process.url}/v1/chat/completions", json=chat(True), headers=HEADERS)
        assert in_flight.status == 200
        process.terminate()
        await asyncio.sleep(0.1)
        async with http.get(f"{process.url}/readyz") as r:
            assert r.status == 503, "readiness fails first"
        async with http.post(f"{process.url}/v1/chat/completions", json=chat(False), headers=HEADERS) as r:
            assert r.status == 200, "traffic is still served during drain_delay_s"
        await asyncio.sleep(0.7)
        async with http.post(f"{process.url}/v1/chat/completions", json=chat(False), headers=HEADERS) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "draining"
        body = await in_flight.read()
        assert body.endswith(b"data: [DONE]\n\n"), "the in-flight stream finished"
    assert await process.stop() == 0


async def test_grace_over_ends_streams_with_an_error_event(serve: Any) -> None:
    process = await serve(drain_delay_s=0, grace_s=0.3, chunk_delay_ms=1000)
    async with aiohttp.ClientSession() as http:
        in_flight = await http.post(f"{process.url}/v1/chat/completions", json=chat(True), headers=HEADERS)
        assert in_flight.status == 200
        process.terminate()
        body = await in_flight.read()
    last = body.strip().split(b"\n\n")[-1]
    assert orjson.loads(last[len(b"data: "):])["error"]["code"] == "draining"
    assert b"data: [DONE]" not in body
    assert await process.stop() == 0


async def test_config_error_exits_2_before_binding(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "bad.yaml"
    config.write_text(render(port=port).replace("type: mock", "type: mokc"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(15):
        _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"providers.mock.type" in err
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # still free: nothing was bound


async def test_config_from_environment_variable(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(render(port=free_port()))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--port", "70000",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LLM_PROXY_CONFIG": str(config)},
    )
    async with asyncio.timeout(15):
        _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--port" in err
