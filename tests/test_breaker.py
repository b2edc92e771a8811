"""Breaker transitions, driven by a fake clock (plain floats) and seeded or fixed randomness."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from proxy.breaker import Breaker, BreakerState, Outcome, SlidingWindow, Ticket
from proxy.config import BreakerConfig

CLOSED, HALF_OPEN, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN
OK, FAIL, NEUTRAL = Outcome.SUCCESS, Outcome.FAILURE, Outcome.NEUTRAL
BASE = BreakerConfig(
    consecutive_failures=3, failure_rate=0.5, min_requests=1000, window_s=10.0,
    open_s=30.0, max_open_s=100.0, half_open_probes=1,
)
PROBE_TIMEOUT_S = 20.0


class Midpoint(random.Random):
    """Jitter factor exactly 1.0, so open times can be asserted exactly."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def make(rng: random.Random | None = None, **overrides: float) -> Breaker:
    config = replace(BASE, **overrides)  # type: ignore[arg-type]
    return Breaker(config=config, rng=rng or Midpoint(), probe_timeout_s=PROBE_TIMEOUT_S)


def through(breaker: Breaker, outcome: Outcome, now: float) -> None:
    ticket = breaker.enter(now)
    assert ticket is not None
    breaker.record(ticket, outcome, now)


def tripped(**overrides: float) -> Breaker:
    """A breaker that opened at t=0 (open until 30 with the default config)."""
    breaker = make(consecutive_failures=1, **overrides)
    through(breaker, FAIL, 0.0)
    assert breaker.state(0.0) is OPEN
    return breaker


@pytest.mark.parametrize(
    ("overrides", "events", "expected"),
    [
        pytest.param({}, [(0, FAIL), (1, FAIL)], CLOSED, id="two-of-three-in-a-row"),
        pytest.param({}, [(0, FAIL), (1, FAIL), (2, FAIL)], OPEN, id="three-in-a-row"),
        pytest.param({}, [(0, FAIL), (1, FAIL), (2, OK), (3, FAIL), (4, FAIL)], CLOSED,
                     id="success-resets-the-streak"),
        pytest.param({}, [(0, FAIL), (1, FAIL), (2, NEUTRAL), (3, FAIL)], OPEN,
                     id="neutral-keeps-the-streak"),
        pytest.param({"consecutive_failures": 100, "min_requests": 4},
                     [(0, OK), (0, OK), (1, FAIL)], CLOSED, id="rate-below-min-requests"),
        pytest.param({"consecutive_failures": 100, "min_requests": 4},
                     [(0, OK), (0, OK), (1, FAIL), (1, FAIL)], OPEN, id="rate-reached"),
        pytest.param({"consecutive_failures": 100, "min_requests": 4},
                     [(0, OK), (0, OK), (0, OK), (1, FAIL), (2, OK), (3, FAIL)], CLOSED,
                     id="rate-under-threshold"),
        pytest.param({"consecutive_failures": 100, "min_requests": 4},
                     [(0, FAIL), (0, FAIL), (20, OK), (20, OK), (21, FAIL)], CLOSED,
                     id="old-failures-left-the-window"),
        pytest.param({"consecutive_failures": 100, "min_requests": 4},
                     [(0, FAIL), (0, FAIL), (20, OK), (20, OK), (21, FAIL), (22, FAIL)], OPEN,
                     id="rate-within-the-window"),
        pytest.param({"consecutive_failures": 100, "min_requests": 2},
                     [(0, NEUTRAL), (0, NEUTRAL), (0, NEUTRAL), (1, FAIL)], CLOSED,
                     id="neutral-is-not-an-outcome-for-the-rate"),
    ],
)
def test_closed_to_open(overrides: dict[str, float], events: list[tuple[float, Outcome]],
                        expected: BreakerState) -> None:
    breaker = make(**overrides)
    for now, outcome in events:
        through(breaker, outcome, now)
    last = events[-1][0]
    assert breaker.state(last) is expected
    assert breaker.can_pass(last) is (expected is CLOSED)


def test_open_refuses_then_half_opens_lazily() -> None:
    breaker = tripped()
    assert breaker.retry_at(0.0) == 30.0
    assert breaker.enter(29.9) is None
    assert not breaker.can_pass(29.9)
    assert breaker.state(29.9) is OPEN
    assert breaker.state(30.0) is HALF_OPEN
    assert breaker.retry_at(30.0) is None
    assert breaker.retry_at(0.0) is None  # the clock does not reopen a half-open breaker


@pytest.mark.parametrize(
    ("probe_failures", "open_for"),
    [(0, 30.0), (1, 60.0), (2, 100.0), (3, 100.0), (60, 100.0)],
    ids=["first", "doubled", "capped", "stays-capped", "no-overflow"],
)
def test_open_time_doubles_and_caps(probe_failures: int, open_for: float) -> None:
    breaker = tripped()
    now = 0.0
    for _ in range(probe_failures):
        now = breaker.retry_at(now) or 0.0
        through(breaker, FAIL, now)
    opens_at = breaker.retry_at(now)
    assert opens_at is not None and opens_at - now == pytest.approx(open_for)


def test_reopens_reset_when_it_closes() -> None:
    breaker = tripped()
    through(breaker, FAIL, 30.0)  # probe failed: open for 60
    through(breaker, OK, 90.0)  # probe succeeded
    assert breaker.state(90.0) is CLOSED
    through(breaker, FAIL, 91.0)
    assert breaker.retry_at(91.0) == pytest.approx(91.0 + 30.0)


def test_open_time_jitter_stays_within_bounds() -> None:
    lengths = []
    for seed in range(300):
        breaker = tripped(rng=random.Random(seed))
        lengths.append(breaker.retry_at(0.0) or 0.0)
    assert 0.8 * 30 <= min(lengths) < 0.83 * 30
    assert 1.17 * 30 < max(lengths) <= 1.2 * 30


def test_seeded_jitter_is_reproducible() -> None:
    first = tripped(rng=random.Random(7)).retry_at(0.0)
    assert first == tripped(rng=random.Random(7)).retry_at(0.0)


@pytest.mark.parametrize(
    ("outcome", "state", "can_pass"),
    [(OK, CLOSED, True), (FAIL, OPEN, False), (NEUTRAL, HALF_OPEN, True)],
    ids=["success-closes", "failure-reopens", "neutral-frees-the-slot"],
)
def test_single_probe(outcome: Outcome, state: BreakerState, can_pass: bool) -> None:
    breaker = tripped()
    probe = breaker.enter(30.0)
    assert probe is not None and probe.probe
    assert not breaker.can_pass(30.0)
    assert breaker.enter(30.0) is None
    breaker.record(probe, outcome, 31.0)
    assert breaker.state(31.0) is state
    assert breaker.can_pass(31.0) is can_pass


def test_probe_slots_and_first_success_closes() -> None:
    breaker = tripped(half_open_probes=2)
    first, second = breaker.enter(30.0), breaker.enter(30.0)
    assert first is not None and second is not None
    assert breaker.enter(30.0) is None
    breaker.record(first, OK, 31.0)
    assert breaker.state(31.0) is CLOSED
    breaker.record(second, FAIL, 32.0)  # a probe of the closed stretch: dropped
    assert breaker.state(32.0) is CLOSED
    assert not breaker.enter(32.0).probe  # type: ignore[union-attr]


def test_one_failed_probe_reopens_with_others_in_flight() -> None:
    breaker = tripped(half_open_probes=2)
    first, second = breaker.enter(30.0), breaker.enter(30.0)
    assert first is not None and second is not None
    breaker.record(first, FAIL, 31.0)
    assert breaker.state(31.0) is OPEN
    breaker.record(second, OK, 32.0)  # too late: it does not close the re-opened breaker
    assert breaker.state(32.0) is OPEN


@pytest.mark.parametrize("consult", ["state", "can_pass", "enter", "retry_at"])
def test_hung_probe_reopens_when_next_consulted(consult: str) -> None:
    breaker = tripped()
    probe = breaker.enter(30.0)
    assert probe is not None
    assert not breaker.can_pass(30.0 + PROBE_TIMEOUT_S - 0.001)
    getattr(breaker, consult)(50.0)
    assert breaker.state(50.0) is OPEN
    assert breaker.retry_at(50.0) == pytest.approx(50.0 + 60.0)
    breaker.record(probe, OK, 51.0)  # the hung probe finally answers: ignored
    assert breaker.state(51.0) is OPEN


def test_probe_recorded_after_its_deadline_counts_as_failed() -> None:
    breaker = tripped()
    probe = breaker.enter(30.0)
    assert probe is not None
    breaker.record(probe, OK, 30.0 + PROBE_TIMEOUT_S)
    assert breaker.state(50.0) is OPEN


@pytest.mark.parametrize("outcome", [OK, FAIL, NEUTRAL])
def test_late_ticket_while_open_is_ignored(outcome: Outcome) -> None:
    breaker = make(consecutive_failures=1)
    slow = breaker.enter(0.0)
    assert slow is not None
    through(breaker, FAIL, 1.0)
    opens_at = breaker.retry_at(1.0)
    breaker.record(slow, outcome, 2.0)
    assert breaker.state(2.0) is OPEN
    assert breaker.retry_at(2.0) == opens_at


@pytest.mark.parametrize("outcome", [OK, FAIL])
def test_late_ticket_while_half_open_is_ignored(outcome: Outcome) -> None:
    breaker = make(consecutive_failures=1)
    slow = breaker.enter(0.0)
    assert slow is not None
    through(breaker, FAIL, 1.0)
    breaker.record(slow, outcome, 40.0)
    assert breaker.state(40.0) is HALF_OPEN
    assert breaker.can_pass(40.0)


def test_late_ticket_from_an_earlier_closed_stretch_is_dropped() -> None:
    breaker = make(consecutive_failures=2)
    slow = breaker.enter(0.0)
    assert slow is not None
    through(breaker, FAIL, 1.0)
    through(breaker, FAIL, 1.0)
    through(breaker, OK, 40.0)  # probe: closed again
    through(breaker, FAIL, 41.0)
    breaker.record(slow, FAIL, 42.0)
    assert breaker.state(42.0) is CLOSED


def test_record_is_idempotent() -> None:
    breaker = make(consecutive_failures=2)
    ticket = breaker.enter(0.0)
    assert ticket is not None
    breaker.record(ticket, FAIL, 0.0)
    breaker.record(ticket, FAIL, 0.0)
    assert breaker.state(0.0) is CLOSED


def test_can_pass_has_no_side_effect() -> None:
    breaker = tripped()
    for _ in range(5):
        assert breaker.can_pass(30.0)
    assert isinstance(breaker.enter(30.0), Ticket)
    assert not breaker.can_pass(30.0)


def test_reconfigure_keeps_the_state() -> None:
    breaker = tripped()
    breaker.reconfigure(replace(BASE, window_s=99.0, open_s=1.0), probe_timeout_s=5.0)
    assert breaker.state(1.0) is OPEN
    assert breaker.retry_at(1.0) == 30.0
    breaker.enter(30.0)
    assert breaker.state(35.0) is OPEN  # the new probe timeout applies


@pytest.mark.parametrize(
    ("window_s", "adds", "at", "totals"),
    [
        (10.0, [(0.0, 1, 0), (5.0, 1, 1)], 5.0, (2, 1)),
        (10.0, [(0.0, 1, 0), (5.0, 1, 1)], 10.5, (1, 1)),
        (10.0, [(0.0, 1, 0), (5.0, 1, 1)], 16.0, (0, 0)),
        (10.0, [(0.0, 1, 0), (5.0, 1, 1)], 1000.0, (0, 0)),
        (10.0, [(5.0, 1, 0), (3.0, 1, 0)], 5.0, (2, 0)),  # clock stepped back
        (0.5, [(0.0, 2, 1), (0.4, 1, 0)], 0.4, (3, 1)),
        (0.5, [(0.0, 2, 1), (0.4, 1, 0)], 0.6, (0, 0)),
        (600.0, [(0.0, 1, 0), (599.0, 1, 0)], 599.0, (2, 0)),
        (600.0, [(0.0, 1, 0), (599.0, 1, 0)], 605.0, (1, 0)),
    ],
)
def test_sliding_window(window_s: float, adds: list[tuple[float, int, int]], at: float,
                        totals: tuple[int, int]) -> None:
    window = SlidingWindow(window_s)
    for now, first, second in adds:
        window.add(now, first, second)
    assert window.totals(at) == totals
