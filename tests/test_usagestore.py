"""Usage counters in the shared store: one hash per key and period, expiring long after its
period (total never), read alike from every replica, kept through an outage, on Redis' clock."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from proxy.errors import GatewayError
from proxy.limitscript import HASH_TAG
from proxy.periods import TOTAL, PeriodClock, period_at
from proxy.ratelimit import Ask, Bucket, Budget

from .redisproc import RedisProcess
from .test_ratelimit import charge, granted, refused
from .test_redislimits import MakeRedis, make_redis, raw, wait_until  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(30)

DAY = period_at("daily", time.time())


async def test_each_period_has_its_own_hash_which_expires_long_after_the_period(
    make_redis: MakeRedis, raw: aioredis.Redis  # noqa: F811
) -> None:
    limiter = await make_redis()
    limiter.record(charge("a", 7, nano_usd=900, period=DAY, model="m1"))
    limiter.record(charge("a", 3, nano_usd=None, period=DAY, model="m2"))
    limiter.record(charge("a", 5, nano_usd=100))
    await limiter.flush()
    daily = f"{HASH_TAG}:usage:{DAY.id}:a"
    assert await raw.hgetall(daily) == {
        b"t": b"10", b"c": b"900", b"r|m1": b"1", b"p|m1": b"7", b"c|m1": b"900",
        b"r|m2": b"1", b"p|m2": b"3", b"u|m2": b"1",
    }
    assert await raw.expiretime(daily) == DAY.expire_at  # through the next day, and 35 days more
    assert await raw.ttl(f"{HASH_TAG}:usage:total:a") == -1  # total: never


async def test_every_replica_reads_the_same_usage(make_redis: MakeRedis) -> None:  # noqa: F811
    first, second = await make_redis(), await make_redis()
    first.record(charge("a", 7, nano_usd=900, period=DAY))
    second.record(charge("a", 3, nano_usd=100, period=DAY))
    await first.flush()
    await second.flush()
    wanted = [("a", DAY.id), ("b", DAY.id)]
    seen = [await replica.usage(wanted) for replica in (first, second)]
    for found in seen:
        spent = found["a", DAY.id]
        assert (spent.tokens, spent.cost_nano, spent.models) == (10, 1000, {"m": [2, 10, 0, 0, 0, 1000, 0]})
        assert found["b", DAY.id].models == {}


async def test_a_period_budget_in_an_outage_uses_the_last_count_and_a_new_period_starts_at_zero(
    make_redis: MakeRedis, redis_server: RedisProcess, raw: aioredis.Redis  # noqa: F811
) -> None:
    limiter = await make_redis()
    rpm = Bucket("key", "a", "rpm", 1000)
    today = Ask([rpm], tokens=1, budget=Budget("a", DAY.id, nano_usd=1000))
    granted(await limiter.admit(today))
    limiter.record(charge("a", 1, nano_usd=600, period=DAY))
    await limiter.flush()
    granted(await limiter.admit(today))  # Redis shows 600 < 1000
    redis_server.stop()
    limiter.record(charge("a", 1, nano_usd=400, period=DAY))
    with pytest.raises(GatewayError) as caught:
        await limiter.usage([("a", DAY.id)])
    assert caught.value.code == "usage_unavailable"
    assert limiter.degraded
    assert refused(await limiter.admit(today)).budget == "usd"  # 600 seen + 400 of its own
    tomorrow = period_at("daily", DAY.end)
    granted(await limiter.admit(Ask([rpm], tokens=1, budget=Budget("a", tomorrow.id, nano_usd=1000))))
    await asyncio.to_thread(redis_server.start)
    await wait_until(lambda: not limiter.degraded)
    await limiter.flush()
    # restarted empty: what the outage spent is there, what Redis lost with its data is not
    assert await raw.hget(f"{HASH_TAG}:usage:{DAY.id}:a", "c") == b"400"


async def test_periods_are_read_on_redis_time_whatever_the_replica_clock_says(
    make_redis: MakeRedis,  # noqa: F811
) -> None:
    behind = PeriodClock(wall=lambda: time.time() - 3 * 86400)  # a replica three days behind
    limiter = await make_redis(period_clock=behind)
    assert behind.offset_s == pytest.approx(3 * 86400, abs=5)
    assert abs(behind.now() - time.time()) < 5
    assert behind.current("total") is TOTAL
    assert limiter.period_clock is behind


async def test_lifetime_token_counts_of_the_old_layout_are_carried_over_once(
    make_redis: MakeRedis, raw: aioredis.Redis  # noqa: F811
) -> None:
    first, second = await make_redis(), await make_redis()  # (each starts on an empty store)
    await raw.set(f"{HASH_TAG}:budget:team-a", 25)
    await raw.set(f"{HASH_TAG}:budget:team-b", 7)
    await raw.hset(f"{HASH_TAG}:usage:total:team-b", "t", 3)
    # two replicas at once: each count moves once
    moved = await asyncio.gather(first.carry_over_budgets(), second.carry_over_budgets())
    assert sum(moved) == 2
    found = await first.usage([("team-a", TOTAL.id), ("team-b", TOTAL.id)])
    assert (found["team-a", TOTAL.id].tokens, found["team-b", TOTAL.id].tokens) == (25, 10)
    assert await raw.exists(f"{HASH_TAG}:budget:team-a", f"{HASH_TAG}:budget:team-b") == 0
    # a token budget of 30 now has 5 left: the carried count is what admission checks
    assert granted(await first.admit(Ask((), 1, Budget("team-a", TOTAL.id, 30, None))))
    first.record(charge("team-a", 5))
    await first.flush()
    assert refused(await first.admit(Ask((), 1, Budget("team-a", TOTAL.id, 30, None))))
