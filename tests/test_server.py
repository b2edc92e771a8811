"""The real process: `llm-proxy serve` on the mock provider, its access log, and the SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import sys
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from .processes import KEY, free_port, render, wait_ok


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
    fields = {"time", "request_id", "api", "key", "model", "provider", "provider_type", "account", "attempts",
              "status", "error_type", "prompt_tokens", "completion_tokens", "cost_usd", "ttft_ms", "duration_ms",
              "stream", "guardrails"}
    assert all(set(line) == fields for line in lines)
    assert [line["provider_type"] for line in lines] == ["mock", "mock", None]
    assert [line["api"] for line in lines] == ["chat", "chat", "chat"]
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


class Logged:
    """`llm-proxy serve` with its stderr kept (the `serve` fixture drops it), stopped by SIGTERM."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc, self.port, self.url = proc, port, f"http://127.0.0.1:{port}"

    async def stop(self) -> tuple[int, bytes, bytes]:
        if self.proc.returncode is None:
            self.proc.terminate()
        async with asyncio.timeout(15):
            out, err = await self.proc.communicate()
        return self.proc.returncode or 0, out, err


@pytest.fixture
async def start_logged(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Logged]]]:
    """Starts a real gateway, optionally under an open-files limit; killed at teardown."""
    from .processes import wait_ready

    started: list[Logged] = []

    async def start(*, server: str = "", open_files: int | None = None) -> Logged:
        port = free_port()
        config = tmp_path / f"logged-{port}.yaml"
        config.write_text(render(port=port).replace("server:\n", f"server:\n{server}", 1))

        def limit_open_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=limit_open_files,
        )
        started.append(Logged(proc, port))
        await wait_ready(started[-1].url)
        return started[-1]

    yield start
    for process in started:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.communicate()


async def test_a_taken_port_is_one_line_naming_the_address(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "taken.yaml"
        config.write_text(render(port=port))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(15):
            _, err = await proc.communicate()
    assert proc.returncode == 1
    text = err.decode()
    assert "Traceback" not in text
    naming = [line for line in text.splitlines() if f"127.0.0.1:{port}" in line]
    assert len(naming) == 1 and "cannot listen" in naming[0] and "in use" in naming[0], text


async def test_the_real_process_answers_and_logs_malformed_requests_without_the_key(start_logged: Any) -> None:
    from .edgeserver import exchange

    process = await start_logged()
    try:
        bare_lf = b"GET /v1/models HTTP/1.1\nHost: gw\nAuthorization: Bearer " + KEY.encode() + b"\n\n"
        control = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: " + KEY.encode() + b"\x01\r\n\r\n"
        for raw in (bare_lf, control):
            answer = await exchange(process.port, raw)
            assert answer.status == 400 and answer.headers["x-request-id"]
            assert orjson.loads(answer.body)["error"]["code"] == "malformed_request"
    finally:
        code, out, err = await process.stop()
    assert code == 0
    assert KEY.encode() not in err + out
    assert err.count(b"malformed request") == 2, err


async def test_out_of_file_descriptors_connections_are_refused_logged_once_and_counted(start_logged: Any) -> None:
    from .edgeserver import read_answer

    # 200 connections under a limit of 160: the cap leaves (160 - 64) / 2 = 48 for clients
    process = await start_logged(server="  header_timeout_s: 50\n", open_files=160)
    connections = [await asyncio.open_connection("127.0.0.1", process.port) for _ in range(200)]
    try:
        served, refused = [], 0
        for reader, writer in connections:
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
                answer = await read_answer(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                refused += 1
                continue
            assert answer.status == 200
            served.append((reader, writer))
        assert refused >= 150 and 1 <= len(served) <= 48
        reader, writer = served[0]
        body = orjson.dumps(chat(False))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert (await read_answer(reader)).status == 200, "the connections it keeps are served in full"
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
        metrics = (await read_answer(reader)).body.decode()
        assert f"llm_proxy_connections_refused_total {float(refused)}" in metrics
    finally:
        for _, writer in connections:
            writer.close()
    await wait_ok(f"{process.url}/healthz")  # serving again once the connections are gone
    code, _, err = await process.stop()
    assert code == 0
    assert err.count(b"refusing new connections") == 1, err
    assert b"Traceback" not in err
