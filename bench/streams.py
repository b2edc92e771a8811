"""Streaming load: an aiohttp SSE client measuring time to first byte, total time and events.

`stream_load` keeps N streams going for a while (scenario c); `hold_streams` opens many slow
streams at once, in batches, and reports whether they all complete (scenario d). Inter-read
gaps show whether events arrive one by one or were buffered somewhere on the way.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from .load import GATEWAY_KEY

HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {GATEWAY_KEY}"}
DONE = b"data: [DONE]"
T = TypeVar("T")


@dataclass
class StreamSample:
    ttfb_s: float | None = None
    total_s: float = 0.0
    events: int = 0
    reads: int = 0
    gaps_s: list[float] = field(default_factory=list)
    done: bool = False
    error: str = ""


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes,
    on_first_byte: Callable[[], None] | None = None, done: bytes = DONE,
) -> StreamSample:
    """One streamed request read to its end; `on_first_byte` runs when the first data arrives;
    `done` is the end marker of the stream's protocol."""
    sample = StreamSample()
    started = last = time.perf_counter()
    tail = b""
    try:
        async with session.post(url, data=body, headers=HEADERS) as response:
            if response.status != 200:
                await response.read()
                sample.error = f"status {response.status}"
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                if sample.ttfb_s is None:
                    sample.ttfb_s = now - started
                    if on_first_byte is not None:
                        on_first_byte()
                else:
                    sample.gaps_s.append(now - last)
                last = now
                sample.reads += 1
                sample.events += chunk.count(b"\n\n")
                sample.done = sample.done or done in tail + chunk
                tail = chunk[-24:]
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        sample.error = type(exc).__name__
    sample.total_s = time.perf_counter() - started
    if not sample.done and not sample.error:
        sample.error = "ended without its end marker"
    return sample


def _session(timeout_s: float) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        auto_decompress=False,
    )


async def stream_load(
    url: str, body: bytes, *, concurrency: int, warmup_s: float, seconds: float,
    probe: Callable[[], T], done: bytes = DONE,
) -> tuple[list[StreamSample], float, tuple[T, T]]:
    """`concurrency` streams back to back for warmup + seconds.

    Returns the samples of the streams that finished after the warm-up, the seconds from then
    until the last one finished, and what `probe` (CPU counters) said at those two moments.
    """
    loop = asyncio.get_running_loop()
    end = loop.time() + warmup_s + seconds
    samples: list[StreamSample] = []
    measuring = False

    async def worker(session: aiohttp.ClientSession) -> None:
        while loop.time() < end:
            sample = await one_stream(session, url, body, done=done)
            if measuring:
                samples.append(sample)

    async with _session(timeout_s=30 + seconds) as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        await asyncio.sleep(warmup_s)
        measuring, before, started = True, probe(), loop.time()
        await asyncio.gather(*workers)
        return samples, loop.time() - started, (before, probe())


class Holding:
    """Streams held at once: at most `opening` connecting at a time; how many are open (first
    byte seen, not finished) and the most that were."""

    def __init__(self, opening: int) -> None:
        self.gate = asyncio.Semaphore(opening)
        self.open = 0
        self.peak = 0

    async def stream(self, session: aiohttp.ClientSession, url: str, body: bytes) -> StreamSample:
        await self.gate.acquire()
        opened = False

        def first_byte() -> None:
            nonlocal opened
            opened = True
            self.gate.release()
            self.open += 1
            self.peak = max(self.peak, self.open)

        sample = await one_stream(session, url, body, on_first_byte=first_byte)
        if opened:
            self.open -= 1
        else:
            self.gate.release()
        return sample

    async def tick(self, on_tick: Callable[[int], None]) -> None:
        while True:
            on_tick(self.open)
            await asyncio.sleep(0.2)


async def hold_streams(
    url: str, body: bytes, *, count: int, opening: int, timeout_s: float,
    on_tick: Callable[[int], None],
) -> tuple[list[StreamSample], int, float]:
    """`count` streams at once, at most `opening` connecting at a time: (samples, peak open, s).

    `on_tick(open_now)` runs every 0.2 s while they run (to sample the gateway's RSS).
    """
    holding = Holding(opening)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with _session(timeout_s=timeout_s) as session:
        ticker = asyncio.create_task(holding.tick(on_tick))
        try:
            samples = await asyncio.gather(*(holding.stream(session, url, body) for _ in range(count)))
        finally:
            ticker.cancel()
    return list(samples), holding.peak, loop.time() - started


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def summarize(samples: list[StreamSample], seconds: float) -> dict[str, Any]:
    """Counts, rates and p50/p99 in milliseconds of what the client saw."""
    good = [s for s in samples if not s.error]
    ttfb = [s.ttfb_s * 1000 for s in good if s.ttfb_s is not None]
    total = [s.total_s * 1000 for s in good]
    gaps = [gap * 1000 for s in good for gap in s.gaps_s]
    return {
        "streams": len(samples),
        "complete": len(good),
        "errors": dict(Counter(s.error for s in samples if s.error)),
        "streams_per_s": len(samples) / seconds if seconds else None,
        "ttfb_p50_ms": percentile(ttfb, 0.5),
        "ttfb_p99_ms": percentile(ttfb, 0.99),
        "total_p50_ms": percentile(total, 0.5),
        "total_p99_ms": percentile(total, 0.99),
        "events_per_stream": statistics.fmean(s.events for s in good) if good else None,
        "reads_per_stream": statistics.fmean(s.reads for s in good) if good else None,
        "gap_p50_ms": percentile(gaps, 0.5),
        "gap_p99_ms": percentile(gaps, 0.99),
    }


def incremental(summary: dict[str, Any], gap_ms: float) -> str:
    """Whether events came one by one, `gap_ms` apart, as the upstream sent them."""
    if gap_ms <= 0:
        return "n/a (no gap)"
    gap, events, reads = summary["gap_p50_ms"], summary["events_per_stream"], summary["reads_per_stream"]
    if not isinstance(gap, float) or not isinstance(events, float) or not isinstance(reads, float):
        return "no data"
    one_by_one = reads >= 0.8 * (events - 2)  # the usage chunk and [DONE] come with the last event
    on_time = 0.7 * gap_ms <= gap <= 1.5 * gap_ms
    return "yes" if one_by_one and on_time else f"no (gap p50 {gap:.1f} ms, {reads:.1f} reads)"
