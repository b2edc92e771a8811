"""Budget periods on a fake clock: UTC boundaries (midnight, the first Monday, month and year
ends, leap day), what a boundary instant belongs to, and `PeriodClock`."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from proxy.periods import RETAIN_S, TOTAL, PeriodClock, iso, period_at, previous_period


def at(text: str) -> float:
    """Unix seconds of an ISO UTC time, e.g. 2024-02-29T23:59:59.999."""
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


# (kind, instant) -> (period id, start, end)
CASES = [
    ("daily", "2026-12-01T00:00:00", ("day:2026-12-01", "2026-12-01T00:00:00", "2026-12-02T00:00:00")),
    ("daily", "2026-11-30T23:59:59.999", ("day:2026-11-30", "2026-11-30T00:00:00", "2026-12-01T00:00:00")),
    ("daily", "2024-02-29T12:00:00", ("day:2024-02-29", "2024-02-29T00:00:00", "2024-03-01T00:00:00")),
    ("daily", "2026-12-31T23:59:59", ("day:2026-12-31", "2026-12-31T00:00:00", "2027-01-01T00:00:00")),
    # weeks start on Monday: 2026-11-30 is one, 2026-12-06 the Sunday that ends its week
    ("weekly", "2026-11-30T00:00:00", ("week:2026-11-30", "2026-11-30T00:00:00", "2026-12-07T00:00:00")),
    ("weekly", "2026-12-06T23:59:59", ("week:2026-11-30", "2026-11-30T00:00:00", "2026-12-07T00:00:00")),
    ("weekly", "2026-11-29T23:59:59", ("week:2026-11-23", "2026-11-23T00:00:00", "2026-11-30T00:00:00")),
    # a week across a year end, and the first Monday of a year
    ("weekly", "2027-01-01T08:00:00", ("week:2026-12-28", "2026-12-28T00:00:00", "2027-01-04T00:00:00")),
    ("weekly", "2027-01-04T00:00:00", ("week:2027-01-04", "2027-01-04T00:00:00", "2027-01-11T00:00:00")),
    ("weekly", "2024-02-29T00:00:00", ("week:2024-02-26", "2024-02-26T00:00:00", "2024-03-04T00:00:00")),
    # month ends: 31, 30, 28 and 29 days, and December into January
    ("monthly", "2026-01-31T23:59:59", ("month:2026-01", "2026-01-01T00:00:00", "2026-02-01T00:00:00")),
    ("monthly", "2026-02-01T00:00:00", ("month:2026-02", "2026-02-01T00:00:00", "2026-03-01T00:00:00")),
    ("monthly", "2026-04-30T23:59:59", ("month:2026-04", "2026-04-01T00:00:00", "2026-05-01T00:00:00")),
    ("monthly", "2024-02-29T23:59:59", ("month:2024-02", "2024-02-01T00:00:00", "2024-03-01T00:00:00")),
    ("monthly", "2026-12-31T23:59:59.5", ("month:2026-12", "2026-12-01T00:00:00", "2027-01-01T00:00:00")),
    ("monthly", "2027-01-01T00:00:00", ("month:2027-01", "2027-01-01T00:00:00", "2027-02-01T00:00:00")),
]


@pytest.mark.parametrize(("kind", "instant", "expected"), CASES)
def test_period_at(kind: str, instant: str, expected: tuple[str, str, str]) -> None:
    period = period_at(kind, at(instant))
    assert (period.id, period.start, period.end) == (expected[0], at(expected[1]), at(expected[2]))
    assert period.expire_at == int(period.end + (period.end - period.start) + RETAIN_S)
    assert (iso(period.start), iso(period.end)) == (expected[1] + "Z", expected[2] + "Z")


def test_previous_periods() -> None:
    assert previous_period("daily", at("2024-03-01T00:00:00")) == period_at("daily", at("2024-02-29T00:00:00"))
    assert previous_period("weekly", at("2027-01-04T00:00:00")) == period_at("weekly", at("2027-01-03T00:00:00"))
    assert previous_period("monthly", at("2024-03-15T00:00:00")).id == "month:2024-02"  # type: ignore[union-attr]
    assert previous_period("monthly", at("2027-01-01T00:00:00")).id == "month:2026-12"  # type: ignore[union-attr]
    assert previous_period("total", at("2027-01-01T00:00:00")) is None


def test_total_is_one_period_that_never_expires() -> None:
    assert period_at("total", 0.0) is TOTAL and period_at("total", 1e12) is TOTAL
    assert (TOTAL.start, TOTAL.end, TOTAL.expire_at) == (-math.inf, math.inf, 0)
    assert iso(TOTAL.start) is None
    with pytest.raises(ValueError):
        period_at("hourly", 0.0)


class FakeWall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_request_straddling_midnight_is_charged_to_the_day_it_was_admitted_in() -> None:
    wall = FakeWall(at("2026-11-30T23:59:59.900"))
    clock = PeriodClock(wall=wall)
    admitted = clock.current("daily")  # what admission stores on the call
    wall.now = at("2026-12-01T00:00:00.250")  # the answer settles after midnight
    assert admitted.id == "day:2026-11-30"
    assert clock.current("daily").id == "day:2026-12-01"  # a new request counts from 0 again
    assert clock.current("weekly").id == "week:2026-11-30" and clock.current("monthly").id == "month:2026-12"


def test_the_clock_follows_the_server_and_a_test_shift() -> None:
    wall = FakeWall(at("2026-12-01T12:00:00"))
    clock = PeriodClock(wall=wall)
    # the server's clock is 90 s ahead; read between wall 12:00:00 and 12:00:02
    clock.see_server_time(at("2026-12-01T12:01:31"), sent_at=wall.now, received_at=wall.now + 2)
    assert clock.offset_s == pytest.approx(90)
    assert clock.now() == pytest.approx(at("2026-12-01T12:01:30"))
    clock.shift_s = at("2026-12-31T23:59:59") - clock.now()
    assert clock.current("monthly").id == "month:2026-12"
    clock.shift_s += 1
    assert clock.current("monthly").id == "month:2027-01"  # the cached period was left behind
    assert clock.current("total") is TOTAL
