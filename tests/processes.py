"""Real `llm-proxy serve` processes for tests: a config on disk, a free port, stop by PID."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

KEY = "sk-drain-test"
CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  workers: {workers}
  drain_delay_s: {drain_delay_s}
  shutdown_grace_s: {grace_s}
redis:
  url: "{redis_url}"
keys:
  - name: tester
    key: {key}
    limits: {key_limits}
providers:
  mock:
    type: mock
    chunk_delay_ms: {chunk_delay_ms}
models:
  demo-chat:
    targets: [{{provider: mock, model: demo-chat}}]
"""


def render(**values: Any) -> str:
    return CONFIG.format(**{
        "key": KEY, "workers": 1, "drain_delay_s": 0, "grace_s": 1, "chunk_delay_ms": 0,
        "redis_url": "", "key_limits": "{}", **values,
    })


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, port: int, config: Path) -> None:
        self.proc = proc
        self.port = port
        self.config = config
        self.url = f"http://127.0.0.1:{port}"
        self.stdout = b""
        self.signalled = False

    def terminate(self) -> None:
        self.signalled = True
        self.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> int:
        if not self.signalled:
            self.terminate()
        async with asyncio.timeout(15):
            out, _ = await self.proc.communicate()
        self.stdout += out
        return self.proc.returncode or 0


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[Process] = []

    async def start(
        *, drain_delay_s: float = 0.5, grace_s: float = 10, chunk_delay_ms: float = 0, workers: int = 1,
        **values: Any,
    ) -> Process:
        port = free_port()
        config = tmp_path / f"config-{port}.yaml"
        config.write_text(
            render(port=port, drain_delay_s=drain_delay_s, grace_s=grace_s, chunk_delay_ms=chunk_delay_ms, workers=workers, **values)
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        process = Process(proc, port, config)
        started.append(process)
        await wait_ready(process.url)
        return process

    yield start
    for process in started:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


async def wait_ready(url: str) -> None:
    await wait_ok(f"{url}/readyz")


async def wait_ok(url: str, within_s: float = 15.0) -> None:
    """Until `url` answers 200; TimeoutError after `within_s`."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(within_s):
        while True:
            try:
                async with http.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


