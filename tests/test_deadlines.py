"""`deadline_at` against what `asyncio.timeout_at` promises: expiry becomes TimeoutError, never
early, late by at most one slot; leaving the block disarms it; a real cancellation stays one.
A deadline with `due` moves when its time comes, without interrupting what the task awaits."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.deadlines import RESOLUTION_S, deadline_at

SLACK_S = 0.05  # scheduling noise of a loaded test machine, on top of the slot


async def test_expiry_is_a_timeout_error_no_earlier_than_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with deadline_at(started + 0.05):
            await asyncio.sleep(5)
    elapsed = loop.time() - started
    assert 0.05 - 0.002 <= elapsed < 0.05 + RESOLUTION_S + SLACK_S


async def test_a_block_that_ends_in_time_is_not_cancelled_later() -> None:
    loop = asyncio.get_running_loop()
    async with deadline_at(loop.time() + 0.03) as deadline:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.08)  # past the deadline: nothing fires into this task
    assert not deadline.expired


async def test_reschedule_later_and_earlier() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with deadline_at(started + 0.03) as deadline:
        deadline.reschedule(started + 0.2)
        await asyncio.sleep(0.08)  # past the first deadline: moved, so still running
    with pytest.raises(TimeoutError):
        async with deadline_at(loop.time() + 5) as deadline:
            deadline.reschedule(loop.time() + 0.02)
            await asyncio.sleep(5)


async def test_a_deadline_in_the_past_expires_at_the_first_await() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with deadline_at(loop.time() - 1):
            await asyncio.sleep(1)


async def test_an_outside_cancel_stays_a_cancel() -> None:
    loop = asyncio.get_running_loop()

    async def guarded() -> None:
        async with deadline_at(loop.time() + 5):
            await asyncio.sleep(5)

    task = asyncio.ensure_future(guarded())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_nested_deadlines_each_raise_for_their_own_block() -> None:
    loop = asyncio.get_running_loop()
    outer_hit = inner_hit = False
    try:
        async with deadline_at(loop.time() + 0.06):
            try:
                async with deadline_at(loop.time() + 0.02):
                    await asyncio.sleep(5)
            except TimeoutError:
                inner_hit = True
            await asyncio.sleep(5)
    except TimeoutError:
        outer_hit = True
    assert inner_hit and outer_hit


async def test_many_concurrent_deadlines_fire_in_order_and_only_once() -> None:
    loop = asyncio.get_running_loop()
    base = loop.time()
    fired: list[int] = []

    async def one(i: int) -> None:
        try:
            async with deadline_at(base + 0.01 + (i % 10) * 0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            fired.append(i % 10)

    async def finishing(i: int) -> None:  # done in time: must not be cancelled
        async with deadline_at(base + 0.2):
            await asyncio.sleep(0.001)

    await asyncio.gather(*(one(i) for i in range(300)), *(finishing(i) for i in range(300)))
    assert len(fired) == 300
    assert fired == sorted(fired)  # slots expire in time order


async def test_a_moving_deadline_asks_due_and_waits_without_interrupting_the_task() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    moved_to = started + 0.15
    asked: list[float] = []
    awaited: asyncio.Future[None] = loop.create_future()  # what the block waits on, like a drain

    def due() -> float:
        asked.append(loop.time())
        return moved_to

    loop.call_at(started + 0.1, awaited.set_result, None)
    async with deadline_at(started + 0.03, due=due):
        await awaited  # past the first time: the deadline moved, so this is not cancelled
    assert not awaited.cancelled()
    assert len(asked) == 1 and asked[0] >= started + 0.03 - 0.002


async def test_a_moving_deadline_expires_once_due_says_its_time_has_come() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    answers = iter([started + 0.05, started + 0.08, started])  # later, later, then no later

    with pytest.raises(TimeoutError):
        async with deadline_at(started + 0.02, due=lambda: next(answers)):
            await asyncio.sleep(5)
    elapsed = loop.time() - started
    assert 0.08 - 0.002 <= elapsed < 0.08 + RESOLUTION_S + SLACK_S


async def test_moving_and_plain_deadlines_share_the_timer_and_each_fires_at_its_time() -> None:
    loop = asyncio.get_running_loop()
    base = loop.time()
    fired: dict[str, float] = {}

    async def guarded(name: str, when: float, **moving: Any) -> None:
        try:
            async with deadline_at(when, **moving):
                await asyncio.sleep(5)
        except TimeoutError:
            fired[name] = loop.time() - base

    await asyncio.gather(
        guarded("moved", base + 0.02, due=lambda: base + 0.12),
        guarded("plain early", base + 0.04),
        guarded("plain late", base + 0.08),
    )
    assert list(sorted(fired, key=fired.__getitem__)) == ["plain early", "plain late", "moved"]
    assert fired["moved"] >= 0.12 - 0.002
