"""SIGHUP on a real process: a valid new config takes effect, an invalid one is refused."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp

from .processes import KEY

HEADERS = {"Authorization": f"Bearer {KEY}"}
NEW_KEY = "sk-added-by-reload"


def chat(model: str = "demo-chat", stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": "a b c d e f"}]}


async def status(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str = KEY) -> int:
    async with http.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
        await r.read()
        return r.status


async def wait_status(http: aiohttp.ClientSession, url: str, body: dict[str, Any], key: str, want: int) -> None:
    async with asyncio.timeout(10):
        while await status(http, url, body, key) != want:
            await asyncio.sleep(0.05)


async def test_sighup_applies_a_valid_config_and_keeps_streams(serve: Any) -> None:
    process = await serve(chunk_delay_ms=100)
    text = process.config.read_text()
    async with aiohttp.ClientSession() as http:
        assert await status(http, process.url, chat(), NEW_KEY) == 401
        in_flight = await http.post(f"{process.url}/v1/chat/completions", json=chat(stream=True), headers=HEADERS)
        assert in_flight.status == 200
        process.config.write_text(
            text.replace("keys:\n", f"keys:\n  - name: added\n    key: {NEW_KEY}\n")
            + "  second-model:\n    targets: [{provider: mock}]\n"
        )
        process.proc.send_signal(signal.SIGHUP)
        await wait_status(http, process.url, chat("second-model"), NEW_KEY, 200)
        assert await status(http, process.url, chat(), KEY) == 200, "old keys still work"
        body = await in_flight.read()
        assert body.endswith(b"data: [DONE]\n\n"), "a stream open across the reload finishes"
    assert await process.stop() == 0


async def test_sighup_with_a_broken_config_keeps_the_old_one(serve: Any) -> None:
    process = await serve()
    async with aiohttp.ClientSession() as http:
        process.config.write_text(process.config.read_text().replace("type: mock", "type: nonsense"))
        process.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert await status(http, process.url, chat(), KEY) == 200
        async with http.get(f"{process.url}/readyz") as r:
            assert r.status == 200
    assert await process.stop() == 0
