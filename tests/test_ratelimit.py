"""Bucket math (table-driven; the Lua script is tested on the same table) and LocalLimiter."""

from __future__ import annotations

import pytest

from proxy.config import Limits
from proxy.periods import TOTAL, Period
from proxy.ratelimit import (
    CONCURRENCY_RETRY_S,
    Ask,
    Bucket,
    Budget,
    Grant,
    LocalLimiter,
    Refusal,
    amount_for,
    buckets_for,
    refill,
    settle_level,
    until_full_s,
    wait_s,
)
from proxy.usage import Charge

# (level, updated, limit, now) -> level at now
REFILL_CASES = [
    ((0.0, 0.0, 60, 1.0), 1.0),
    ((0.0, 0.0, 60, 120.0), 60.0),
    ((10.0, 5.0, 60, 5.0), 10.0),
    ((10.0, 5.0, 60, 4.0), 10.0),  # a clock that stepped back refills nothing
    ((-30.0, 0.0, 60, 10.0), -20.0),  # debt refills like any deficit
    ((0.5, 100.0, 1000, 100.03), 1.0),
    ((59.0, 0.0, 60, 1e9), 60.0),
]
# (level, amount, limit) -> seconds until the bucket holds amount
WAIT_CASES = [
    ((5.0, 1, 60), 0.0),
    ((1.0, 1, 60), 0.0),
    ((0.0, 1, 60), 1.0),
    ((0.5, 1, 60), 0.5),
    ((-100.0, 1, 1000), 6.06),
    ((0.0, 1000, 1000), 60.0),
    ((30.0, 60, 60), 30.0),  # also until_full_s(30, 60)
]
# (level, limit, reserved, used) -> level after settlement
SETTLE_CASES = [
    ((400.0, 1000, 600, 100), 900.0),
    ((900.0, 1000, 600, 100), 1000.0),
    ((300.0, 1000, 600, 1000), -100.0),
    ((0.0, 1000, 0, 0), 0.0),
    ((10.0, 100, 50, 50), 10.0),
]


@pytest.mark.parametrize(("args", "expected"), REFILL_CASES)
def test_refill(args: tuple[float, float, int, float], expected: float) -> None:
    assert refill(*args) == pytest.approx(expected)


@pytest.mark.parametrize(("args", "expected"), WAIT_CASES)
def test_wait(args: tuple[float, int, int], expected: float) -> None:
    assert wait_s(*args) == pytest.approx(expected)


@pytest.mark.parametrize(("args", "expected"), SETTLE_CASES)
def test_settle_level(args: tuple[float, int, int, int], expected: float) -> None:
    assert settle_level(*args) == pytest.approx(expected)


def test_until_full() -> None:
    assert until_full_s(60.0, 60) == 0.0
    assert until_full_s(30.0, 60) == pytest.approx(30.0)
    assert until_full_s(-60.0, 60) == pytest.approx(120.0)


def test_amounts() -> None:
    tpm = Bucket("key", "a", "tpm", 1000)
    assert amount_for(tpm, 300) == 300
    assert amount_for(tpm, 5000) == 1000  # capped at the bucket's size
    assert amount_for(tpm, 0) == 1
    assert amount_for(Bucket("key", "a", "rpm", 5), 300) == 1
    assert amount_for(Bucket("key", "a", "concurrency", 5), 300) == 1


def test_buckets_for() -> None:
    assert buckets_for("key", "a", Limits()) == ()
    rpm, tpm, conc = buckets_for("key", "a", Limits(rpm=10, tpm=1000, concurrency=3), divisor=4)
    assert (rpm.dimension, rpm.limit, rpm.id) == ("rpm", 2, "key:a:rpm")
    assert (tpm.limit, conc.limit) == (250, 1)  # at least 1
    (only,) = buckets_for("model", "m", Limits(tpm=9))
    assert only == Bucket("model", "m", "tpm", 9) and only.id == "model:m:tpm"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> LocalLimiter:
    return LocalLimiter(clock=clock)


def granted(outcome: Grant | Refusal) -> Grant:
    assert isinstance(outcome, Grant), outcome
    return outcome


def refused(outcome: Grant | Refusal) -> Refusal:
    assert isinstance(outcome, Refusal), outcome
    return outcome


def test_rpm_refills_over_the_minute(limiter: LocalLimiter, clock: FakeClock) -> None:
    rpm = Bucket("key", "a", "rpm", 3)
    ask = Ask([rpm], tokens=10)
    for remaining in (2, 1, 0):
        assert granted(limiter.admit_now(ask)).levels[rpm.id] == pytest.approx(
            (remaining, (3 - remaining) * 20.0)
        )
    refusal = refused(limiter.admit_now(ask))
    assert refusal.bucket == rpm and refusal.retry_after_s == pytest.approx(20.0)
    clock.now += 19.9
    refused(limiter.admit_now(ask))
    clock.now += 0.1
    granted(limiter.admit_now(ask))


def test_tpm_reserves_then_refunds_or_charges_debt(limiter: LocalLimiter, clock: FakeClock) -> None:
    tpm = Bucket("key", "a", "tpm", 1000)
    first = granted(limiter.admit_now(Ask([tpm], tokens=600)))
    assert first.levels[tpm.id][0] == pytest.approx(400)
    limiter.settle(first, 100)  # refund 500
    second = granted(limiter.admit_now(Ask([tpm], tokens=600)))
    assert second.levels[tpm.id][0] == pytest.approx(300)
    limiter.settle(second, 1000)  # 400 more than reserved: debt
    refusal = refused(limiter.admit_now(Ask([tpm], tokens=1)))
    assert refusal.levels[tpm.id][0] == pytest.approx(-100)
    assert refusal.retry_after_s == pytest.approx(101 * 60 / 1000)
    clock.now += 6.061
    granted(limiter.admit_now(Ask([tpm], tokens=1)))


def test_reservation_is_capped_at_the_bucket(limiter: LocalLimiter) -> None:
    tpm = Bucket("key", "a", "tpm", 1000)
    grant = granted(limiter.admit_now(Ask([tpm], tokens=50_000)))
    assert grant.reserved == ((tpm, 1000),) and grant.levels[tpm.id][0] == 0


def test_concurrency_leases(limiter: LocalLimiter) -> None:
    conc = Bucket("key", "a", "concurrency", 2)
    ask = Ask([conc], tokens=1)
    one, two = granted(limiter.admit_now(ask)), granted(limiter.admit_now(ask))
    assert two.levels[conc.id] == (0, 0)
    refusal = refused(limiter.admit_now(ask))
    assert (refusal.bucket, refusal.retry_after_s) == (conc, CONCURRENCY_RETRY_S)
    limiter.settle(one, 0)
    limiter.settle(one, 0)  # idempotent: frees one lease, not two
    granted(limiter.admit_now(ask))
    refused(limiter.admit_now(ask))
    limiter.settle(two, 0)
    granted(limiter.admit_now(ask))


def test_refused_admission_spends_nothing(limiter: LocalLimiter) -> None:
    key_rpm, model_rpm = Bucket("key", "a", "rpm", 10), Bucket("model", "m", "rpm", 1)
    tpm, conc = Bucket("key", "a", "tpm", 100), Bucket("key", "a", "concurrency", 5)
    ask = Ask([key_rpm, tpm, conc, model_rpm], tokens=30)
    granted(limiter.admit_now(ask))
    refusal = refused(limiter.admit_now(ask))
    assert refusal.bucket == model_rpm
    after = refused(limiter.admit_now(ask)).levels
    assert after[key_rpm.id][0] == pytest.approx(9)
    assert after[tpm.id][0] == pytest.approx(70)
    assert after[conc.id][0] == 4


def test_longest_wait_names_the_refusal(limiter: LocalLimiter) -> None:
    rpm, tpm = Bucket("key", "a", "rpm", 1), Bucket("model", "m", "tpm", 100)
    granted(limiter.admit_now(Ask([rpm, tpm], tokens=100)))
    refusal = refused(limiter.admit_now(Ask([rpm, tpm], tokens=100)))
    assert refusal.bucket == rpm and refusal.retry_after_s == pytest.approx(60)


def charge(key: str, tokens: int, nano_usd: int | None = 0, period: Period = TOTAL, model: str = "m") -> Charge:
    """A settled request of `tokens` (all prompt) costing `nano_usd`."""
    return Charge(key, period, model, tokens, 0, 0, 0, tokens, nano_usd)


def test_budget_counts_recorded_usage(limiter: LocalLimiter) -> None:
    rpm = Bucket("key", "a", "rpm", 100)
    ask = Ask([rpm], tokens=10, budget=Budget("a", "total", tokens=100))
    limiter.settle(granted(limiter.admit_now(ask)), 60)
    limiter.record(charge("a", 60))
    granted(limiter.admit_now(ask))  # 60 < 100: the last one may overshoot
    limiter.record(charge("a", 60))
    assert limiter.ledger.spent("a", "total") == (120, 0)
    refusal = refused(limiter.admit_now(ask))
    assert refusal.bucket is None and refusal.budget == "tokens" and rpm.id in refusal.levels
    granted(limiter.admit_now(Ask([rpm], tokens=10, budget=Budget("b", "total", tokens=100))))
    granted(limiter.admit_now(Ask([rpm], tokens=10, budget=Budget("a", "day:2026-12-02", tokens=100))))


def test_a_money_budget_refuses_once_its_cost_is_reached(limiter: LocalLimiter) -> None:
    ask = Ask([], tokens=10, budget=Budget("a", "total", tokens=10_000, nano_usd=1000))
    limiter.record(charge("a", 5, nano_usd=999))
    granted(limiter.admit_now(ask))
    limiter.record(charge("a", 5, nano_usd=1))
    assert refused(limiter.admit_now(ask)).budget == "usd"


async def test_admit_is_the_same_decision(limiter: LocalLimiter) -> None:
    rpm = Bucket("key", "a", "rpm", 1)
    await limiter.start()
    granted(await limiter.admit(Ask([rpm], tokens=1)))
    refused(await limiter.admit(Ask([rpm], tokens=1)))
    assert limiter.degraded is False
    await limiter.close()
