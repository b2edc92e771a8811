"""The same limiter behaviour on both stores, then what only the shared store does: coalescing,
replicas on one Redis, lease expiry and renewal, outages and recovery. Redis is a real server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.config import RedisConfig
from proxy.errors import GatewayError
from proxy.limitscript import HASH_TAG, MATH_LUA
from proxy.ratelimit import (
    CONCURRENCY_RETRY_S,
    MAX_TOKENS,
    Ask,
    Bucket,
    Budget,
    Grant,
    LocalLimiter,
    Refusal,
    refill,
    settle_level,
    wait_s,
)
from proxy.redislimits import RedisLimiter
from proxy.cost import MAX_COST_NANO

from .redisproc import RedisProcess
from .test_ratelimit import REFILL_CASES, SETTLE_CASES, WAIT_CASES, charge, granted, refused

pytestmark = pytest.mark.timeout(30)

TIMEOUT_MS = 100
# Scheduling slack on top of timeout_ms for "no call hangs" (a busy CI machine included).
SLACK_S = 0.1
TEARDOWN_S = 5.0

Store = LocalLimiter | RedisLimiter
MakeStore = Callable[..., Awaitable[Store]]
MakeRedis = Callable[..., Awaitable[RedisLimiter]]


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def make_redis(redis_server: RedisProcess) -> AsyncIterator[MakeRedis]:
    made: list[RedisLimiter] = []

    async def make(on_error: str = "fail_open", **options: Any) -> RedisLimiter:
        config = RedisConfig(url=redis_server.url, timeout_ms=TIMEOUT_MS, on_error=on_error)
        limiter = RedisLimiter(config=config, **options)
        await limiter.start()
        made.append(limiter)
        return limiter

    yield make
    async with asyncio.timeout(TEARDOWN_S):  # an unbounded teardown would escape the test timeout
        for limiter in made:
            await limiter.close()


@pytest.fixture(params=["local", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    made: list[Store] = []

    async def make() -> Store:
        store: Store
        if request.param == "local":
            store = LocalLimiter()
        else:
            server: RedisProcess = request.getfixturevalue("redis_server")
            store = RedisLimiter(config=RedisConfig(url=server.url, timeout_ms=TIMEOUT_MS))
        await store.start()
        made.append(store)
        return store

    yield make
    async with asyncio.timeout(TEARDOWN_S):
        for store in made:
            await store.close()


async def wait_until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_lua_math_matches_the_python_table(raw: aioredis.Redis) -> None:
    harness = MATH_LUA + """
local out = {}
for i, case in ipairs(cjson.decode(ARGV[1])) do
  local f, a = case[1], case[2]
  if f == 'refill' then out[i] = refill(a[1], a[2], a[3], a[4])
  elseif f == 'wait' then out[i] = wait_s(a[1], a[2], a[3])
  else out[i] = settle_level(a[1], a[2], a[3], a[4]) end
end
return cjson.encode(out)
"""
    table = (
        [("refill", args, want) for args, want in REFILL_CASES]
        + [("wait", args, want) for args, want in WAIT_CASES]
        + [("settle", args, want) for args, want in SETTLE_CASES]
    )
    cases = orjson.dumps([[name, args] for name, args, _ in table])
    results = orjson.loads(await raw.eval(harness, 0, cases))
    python: dict[str, Callable[..., float]] = {
        "refill": refill, "wait": wait_s, "settle": settle_level
    }
    for (name, args, want), got in zip(table, results, strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9), (name, args)
        assert got == pytest.approx(python[name](*args), rel=1e-9, abs=1e-9), (name, args)


async def test_rpm(make_store: MakeStore) -> None:
    store = await make_store()
    rpm = Bucket("key", "a", "rpm", 3)
    for _ in range(3):
        granted(await store.admit(Ask([rpm], tokens=5)))
    refusal = refused(await store.admit(Ask([rpm], tokens=5)))
    assert refusal.bucket == rpm
    assert refusal.retry_after_s == pytest.approx(20.0, abs=0.5)


async def test_tpm_refund_and_debt(make_store: MakeStore) -> None:
    store = await make_store()
    tpm = Bucket("key", "a", "tpm", 600)  # refills 10 tokens a second
    first = granted(await store.admit(Ask([tpm], tokens=400)))
    assert first.levels[tpm.id][0] == pytest.approx(200, abs=3)
    store.settle(first, 100)  # 300 back
    second = granted(await store.admit(Ask([tpm], tokens=400)))
    assert second.levels[tpm.id][0] == pytest.approx(100, abs=3)
    store.settle(second, 700)  # 300 more than reserved: debt
    refusal = refused(await store.admit(Ask([tpm], tokens=1)))
    assert refusal.levels[tpm.id][0] == pytest.approx(-200, abs=3)
    assert refusal.retry_after_s == pytest.approx(20.1, abs=0.3)
    assert refusal.bucket == tpm


async def test_concurrency_leases_and_release(make_store: MakeStore) -> None:
    store = await make_store()
    conc = Bucket("key", "a", "concurrency", 2)
    one = granted(await store.admit(Ask([conc], tokens=1)))
    two = granted(await store.admit(Ask([conc], tokens=1)))
    assert two.levels[conc.id][0] == 0
    refusal = refused(await store.admit(Ask([conc], tokens=1)))
    assert (refusal.bucket, refusal.retry_after_s) == (conc, CONCURRENCY_RETRY_S)
    store.settle(one, 0)
    granted(await store.admit(Ask([conc], tokens=1)))
    refused(await store.admit(Ask([conc], tokens=1)))
    store.settle(two, 0)
    granted(await store.admit(Ask([conc], tokens=1)))


async def test_all_or_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    key_rpm, model_rpm = Bucket("key", "a", "rpm", 10), Bucket("model", "m", "rpm", 1)
    tpm, conc = Bucket("key", "a", "tpm", 6000), Bucket("key", "a", "concurrency", 5)
    ask = Ask([key_rpm, tpm, conc, model_rpm], tokens=3000)
    granted(await store.admit(ask))
    for _ in range(3):
        refusal = refused(await store.admit(ask))
        assert refusal.bucket == model_rpm
    levels = refusal.levels
    assert levels[key_rpm.id][0] == pytest.approx(9, abs=0.1)
    assert levels[tpm.id][0] == pytest.approx(3000, abs=10)
    assert levels[conc.id][0] == 4


async def test_budget_is_402_once_spent(make_store: MakeStore) -> None:
    store = await make_store()
    rpm = Bucket("key", "a", "rpm", 100)
    ask = Ask([rpm], tokens=10, budget=Budget("a", "total", tokens=100))
    for _ in range(2):  # under budget when admitted: may overshoot
        store.settle(granted(await store.admit(ask)), 60)
        store.record(charge("a", 60))
    refusal = refused(await store.admit(ask))
    assert refusal.bucket is None and refusal.budget == "tokens"
    assert refusal.levels[rpm.id][0] == pytest.approx(98, abs=0.1)
    granted(await store.admit(Ask([rpm], tokens=10, budget=Budget("b", "total", tokens=100))))
    money = Budget("a", "total", nano_usd=1500)
    granted(await store.admit(Ask([rpm], tokens=10, budget=money)))
    store.record(charge("a", 1, nano_usd=1500))
    assert refused(await store.admit(Ask([rpm], tokens=10, budget=money))).budget == "usd"


async def test_levels_for_headers(make_store: MakeStore) -> None:
    store = await make_store()
    rpm, tpm = Bucket("key", "a", "rpm", 60), Bucket("key", "a", "tpm", 6000)
    grant = granted(await store.admit(Ask([rpm, tpm], tokens=1500)))
    assert grant.levels[rpm.id] == pytest.approx((59, 1.0), abs=0.05)
    assert grant.levels[tpm.id] == pytest.approx((4500, 15.0), abs=0.5)


async def test_settlement_is_idempotent(make_store: MakeStore) -> None:
    store = await make_store()
    tpm = Bucket("key", "a", "tpm", 600)
    ask = Ask([tpm], tokens=300)
    grant = granted(await store.admit(ask))
    store.settle(grant, 100)
    store.settle(grant, 100)
    store.settle(grant, 5000)
    after = granted(await store.admit(ask))
    assert after.levels[tpm.id][0] == pytest.approx(200, abs=3)  # 600 - 300 + 300 - 100 - 300


async def test_concurrent_admissions_are_exact(make_store: MakeStore) -> None:
    store = await make_store()
    rpm = Bucket("key", "a", "rpm", 40)
    calls = store.script_calls if isinstance(store, RedisLimiter) else 0
    outcomes = await asyncio.gather(*(store.admit(Ask([rpm], tokens=1)) for _ in range(150)))
    admitted = sum(isinstance(o, Grant) for o in outcomes)
    assert 40 <= admitted <= 41
    if isinstance(store, RedisLimiter):
        assert store.script_calls - calls <= 5  # coalesced, not 150 round trips


async def test_three_replicas_share_one_redis(make_redis: MakeRedis) -> None:
    replicas = [await make_redis() for _ in range(3)]
    await asyncio.gather(*(r.start() for r in replicas))  # heartbeat again: all see each other
    assert [r.replicas for r in replicas] == [3, 3, 3]
    rpm = Bucket("key", "a", "rpm", 40)
    outcomes = await asyncio.gather(
        *(replicas[i % 3].admit(Ask([rpm], tokens=1)) for i in range(150))
    )
    assert 40 <= sum(isinstance(o, Grant) for o in outcomes) <= 41
    assert sum(r.script_calls for r in replicas) < 30


async def test_dead_replica_leases_expire(make_redis: MakeRedis) -> None:
    dying, survivor = await make_redis(lease_ttl_s=0.6), await make_redis(lease_ttl_s=0.6)
    conc = Bucket("key", "a", "concurrency", 2)
    granted(await dying.admit(Ask([conc], tokens=1)))
    granted(await dying.admit(Ask([conc], tokens=1)))
    refused(await survivor.admit(Ask([conc], tokens=1)))
    await dying.close()  # gone without settling: nothing renews its leases any more
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcome: Grant | Refusal = Refusal(None, 0, {})
    async with asyncio.timeout(3):
        while not isinstance(outcome, Grant):
            await asyncio.sleep(0.05)
            outcome = await survivor.admit(Ask([conc], tokens=1))
    assert loop.time() - started > 0.2  # not released, expired


async def test_leases_are_renewed_while_held(make_redis: MakeRedis) -> None:
    holder, other = await make_redis(lease_ttl_s=0.6), await make_redis(lease_ttl_s=0.6)
    conc = Bucket("key", "a", "concurrency", 1)
    grant = granted(await holder.admit(Ask([conc], tokens=1)))
    await asyncio.sleep(1.5)  # 2.5 lease lifetimes: only renewal keeps it
    refused(await other.admit(Ask([conc], tokens=1)))
    holder.settle(grant, 0)
    await holder.flush()
    granted(await other.admit(Ask([conc], tokens=1)))


async def test_keys_share_one_hash_tag_and_scripts_reload(
    make_redis: MakeRedis, raw: aioredis.Redis
) -> None:
    limiter = await make_redis()
    buckets = [Bucket("key", "a", "rpm", 9), Bucket("model", "m", "tpm", 900),
               Bucket("account", "p/x", "concurrency", 9)]
    budget = Budget("a", "total", tokens=1000)
    limiter.settle(granted(await limiter.admit(Ask(buckets, 10, budget))), 20)
    limiter.record(charge("a", 20))
    await limiter.flush()
    keys = [key.decode() if isinstance(key, bytes) else key for key in await raw.keys("*")]
    assert len(keys) >= 4 and all(key.startswith(HASH_TAG + ":") for key in keys)
    await raw.script_flush()
    granted(await limiter.admit(Ask(buckets, 10, budget)))  # NOSCRIPT: loaded again
    assert await raw.hget(HASH_TAG + ":usage:total:a", "t") == b"20"


async def test_outage_fail_open(
    make_redis: MakeRedis,
    redis_server: RedisProcess,
    raw: aioredis.Redis,
) -> None:
    limiter, _peer = await make_redis(), await make_redis()
    await limiter.start()
    assert limiter.replicas == 2
    rpm = Bucket("key", "a", "rpm", 40)
    ask = Ask([rpm], tokens=10, budget=Budget("a", "total", tokens=10_000))
    limiter.settle(granted(await limiter.admit(ask)), 7)
    limiter.record(charge("a", 7))
    await limiter.flush()
    redis_server.stop()
    loop = asyncio.get_running_loop()
    outcomes = []
    for _ in range(30):
        started = loop.time()
        outcomes.append(await limiter.admit(ask))
        assert loop.time() - started < TIMEOUT_MS / 1000 + SLACK_S
    assert limiter.degraded
    grants = [o for o in outcomes if isinstance(o, Grant)]
    assert len(grants) == 20  # local buckets of 40 ÷ 2 replicas
    for grant in grants:
        limiter.settle(grant, 5)
        limiter.record(charge("a", 5))
    await asyncio.to_thread(redis_server.start)  # restarted empty: no persistence
    await wait_until(lambda: not limiter.degraded)
    await limiter.flush()
    assert await raw.hget(HASH_TAG + ":usage:total:a", "t") == b"100"  # kept through the outage
    calls = limiter.script_calls
    granted(await limiter.admit(ask))
    assert limiter.script_calls == calls + 1  # shared again


async def test_outage_fail_closed(
    make_redis: MakeRedis, redis_server: RedisProcess
) -> None:
    limiter = await make_redis(on_error="fail_closed")
    rpm = Bucket("key", "a", "rpm", 40)
    granted(await limiter.admit(Ask([rpm], tokens=1)))
    redis_server.stop()
    for _ in range(3):
        with pytest.raises(GatewayError) as caught:
            await limiter.admit(Ask([rpm], tokens=1))
        error = caught.value
        assert (error.status, error.code) == (503, "ratelimit_unavailable")
        assert error.headers()["Retry-After"] == "1"
    assert limiter.degraded
    await asyncio.to_thread(redis_server.start)
    await wait_until(lambda: not limiter.degraded)
    granted(await limiter.admit(Ask([rpm], tokens=1)))


async def test_unresponsive_redis_never_hangs_a_call(
    make_redis: MakeRedis,
    redis_server: RedisProcess,
    raw: aioredis.Redis,
) -> None:
    limiter = await make_redis()
    rpm = Bucket("key", "a", "rpm", 40)
    ask = Ask([rpm], tokens=1, budget=Budget("a", "total", tokens=1000))
    grant = granted(await limiter.admit(ask))
    redis_server.pause()
    try:
        loop = asyncio.get_running_loop()
        limiter.settle(grant, 70)
        limiter.record(charge("a", 70))
        for _ in range(5):  # three timeouts in a row: unreachable
            started = loop.time()
            granted(await limiter.admit(ask))
            assert loop.time() - started < TIMEOUT_MS / 1000 + SLACK_S
        assert limiter.degraded
    finally:
        redis_server.resume()
    await wait_until(lambda: not limiter.degraded)
    await limiter.flush()
    # The timed-out calls may have run once Redis woke; the settlement still counts once.
    assert await raw.hget(HASH_TAG + ":usage:total:a", "t") == b"70"


async def test_close_flushes_pending_settlements(
    make_redis: MakeRedis, raw: aioredis.Redis
) -> None:
    limiter = await make_redis()
    ask = Ask([Bucket("key", "a", "rpm", 40)], tokens=1, budget=Budget("a", "total", tokens=1000))
    grants = await asyncio.gather(*(limiter.admit(ask) for _ in range(10)))
    for grant in grants:
        limiter.settle(granted(grant), 3)
        limiter.record(charge("a", 3))
    await limiter.close()
    assert await raw.hget(HASH_TAG + ":usage:total:a", "t") == b"30"


async def test_a_grant_decided_as_its_admission_is_cancelled_is_given_back(
    make_redis: MakeRedis, raw: aioredis.Redis
) -> None:
    """The client leaves after the batch answered but before its handler resumed: the grant that
    was already decided must still be released, not renewed for ever."""
    limiter = await make_redis()
    conc = Bucket("key", "a", "concurrency", 10)
    ask = Ask([conc], tokens=1)
    victim: asyncio.Task[Grant | Refusal]

    async def admit_then_cancel_the_next() -> None:
        # queued first in the same batch, so it resumes first: the victim's future is then
        # already resolved, and its task not yet resumed
        limiter.settle(granted(await limiter.admit(ask)), 0)
        victim.cancel()

    first = asyncio.create_task(admit_then_cancel_the_next())
    victim = asyncio.create_task(limiter.admit(ask))
    calls = limiter.script_calls
    await first
    with pytest.raises(asyncio.CancelledError):
        await victim
    assert limiter.script_calls == calls + 1  # both were decided by one call
    await limiter.flush()
    assert await raw.zcard(f"{HASH_TAG}:lease:{conc.id}") == 0


async def test_an_absurd_usage_figure_cannot_poison_the_shared_store(
    make_redis: MakeRedis, raw: aioredis.Redis
) -> None:
    limiter = await make_redis(on_error="fail_closed")
    ask = Ask([Bucket("key", "a", "rpm", 1000)], tokens=1, budget=Budget("a", "total", tokens=1 << 52))
    for absurd in (1 << 64, 1 << 70, -(1 << 64)):
        limiter.settle(granted(await limiter.admit(ask)), absurd)
        # the most a charge can hold: usage figures are capped at MAX_TOKENS, costs at MAX_COST_NANO
        limiter.record(charge("a", 2 * MAX_TOKENS, nano_usd=MAX_COST_NANO))
        await limiter.flush()
    calls = limiter.script_calls
    for _ in range(3):
        granted(await limiter.admit(ask))  # still decided by Redis, not refused with 503
    assert limiter.script_calls > calls and not limiter.degraded
    assert int(await raw.hget(HASH_TAG + ":usage:total:a", "t") or 0) == 6 * MAX_TOKENS
    assert int(await raw.hget(HASH_TAG + ":usage:total:a", "c") or 0) == 3 * MAX_COST_NANO


async def test_a_record_that_cannot_be_encoded_is_dropped_not_retried_for_ever(
    make_redis: MakeRedis, caplog: pytest.LogCaptureFixture
) -> None:
    limiter = await make_redis(on_error="fail_closed")
    tpm = Bucket("key", "a", "tpm", 1000)
    # no admission issues such a grant (reservations are capped at the bucket's size): the
    # defence behind the clamps, should one ever be missed
    poisoned = Grant(id="x:1", levels={}, leases=(), reserved=((tpm, 1 << 70),), remote=True)
    limiter.settle(poisoned, 1)
    await limiter.flush()
    assert "cannot be encoded" in caplog.text
    calls = limiter.script_calls
    granted(await limiter.admit(Ask([tpm], tokens=1)))
    assert limiter.script_calls == calls + 1 and not limiter.degraded


async def test_a_lease_settled_as_its_renewal_is_queued_is_not_brought_back(
    make_redis: MakeRedis, raw: aioredis.Redis
) -> None:
    """A renewal queued for a grant that then settles rides in the same script call as the
    settlement: it must not add the released lease back for another lease lifetime."""
    limiter = await make_redis()
    conc = Bucket("key", "a", "concurrency", 2)
    grant = granted(await limiter.admit(Ask([conc], tokens=1)))
    await limiter._renew()  # the periodic renewal, due right now
    limiter.settle(grant, 0)
    await limiter.flush()
    assert await raw.zcard(f"{HASH_TAG}:lease:{conc.id}") == 0
