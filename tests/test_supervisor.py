"""`--workers 2`: two processes share the port, a killed one is replaced, metrics add up."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.supervisor import METRICS_DIR_PREFIX, remove_orphaned_metrics_dirs

from .processes import KEY

HEADERS = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "demo-chat", "messages": [{"role": "user", "content": "x y"}]}


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


async def wait_workers(pid: int, count: int, *, besides: set[int] = frozenset()) -> set[int]:
    async with asyncio.timeout(15):
        while True:
            kids = children(pid)
            if len(kids) == count and not kids & besides:
                return kids
            await asyncio.sleep(0.05)


async def requests_total(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        text = await r.text()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples
        if s.name == "llm_proxy_requests_total" and s.labels.get("status") == "200"
    )


async def test_killed_worker_is_replaced_and_the_port_keeps_answering(serve: Any) -> None:
    process = await serve(workers=2)
    workers = await wait_workers(process.proc.pid, 2)
    victim = min(workers)
    async with aiohttp.ClientSession() as http:
        os.kill(victim, signal.SIGKILL)
        replaced = await wait_workers(process.proc.pid, 2, besides={victim})
        assert victim not in replaced and len(replaced & workers) == 1
        for _ in range(20):
            async with http.post(f"{process.url}/v1/chat/completions", json=CHAT, headers=HEADERS) as r:
                assert r.status == 200
    assert await process.stop() == 0
    assert children(process.proc.pid) == set()


async def test_metrics_are_the_sum_over_workers(serve: Any) -> None:
    process = await serve(workers=2)
    await wait_workers(process.proc.pid, 2)
    async with aiohttp.ClientSession() as http:
        for _ in range(30):
            # a new connection each time, so both workers get some of the traffic
            async with aiohttp.ClientSession() as fresh:
                async with fresh.post(f"{process.url}/v1/chat/completions", json=CHAT, headers=HEADERS) as r:
                    assert r.status == 200
        for _ in range(4):
            assert await requests_total(http, process.url) == 30
    assert await process.stop() == 0


def test_metrics_directories_of_dead_supervisors_are_removed(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL cannot remove its metrics directory; the next one does."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its PID is now free: the directory it names is orphaned
    orphan = tmp_path / f"{METRICS_DIR_PREFIX}{gone.pid}-abc"
    mine = tmp_path / f"{METRICS_DIR_PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / f"{METRICS_DIR_PREFIX}notapid-ghi"
    for directory in (orphan, mine, unrelated):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"x")
    removed = remove_orphaned_metrics_dirs(str(tmp_path))
    assert removed == [str(orphan)]
    assert not orphan.exists() and mine.exists() and unrelated.exists()
