"""The retry budget: a share of recent first attempts plus a per-second floor, over a window."""

from __future__ import annotations

import pytest

from proxy.retrybudget import RetryBudget


def allowed(budget: RetryBudget, now: float, tries: int) -> int:
    return sum(budget.try_retry(now) for _ in range(tries))


@pytest.mark.parametrize(
    ("ratio", "min_per_s", "firsts", "expected"),
    [
        (0.2, 1.0, 0, 10),  # a quiet gateway still fails over: the floor alone
        (0.2, 1.0, 100, 30),
        (0.2, 0.0, 100, 20),
        (0.2, 0.0, 4, 1),  # 0.8 allowed: the first retry goes (0 < 0.8), the second does not
        (0.0, 0.0, 1000, 0),
        (1.0, 0.5, 10, 15),
    ],
)
def test_allowance(ratio: float, min_per_s: float, firsts: int, expected: int) -> None:
    budget = RetryBudget(ratio=ratio, min_per_s=min_per_s)
    for _ in range(firsts):
        budget.record_first(0.0)
    assert allowed(budget, 0.5, 1000) == expected


def test_refusals_are_not_counted() -> None:
    budget = RetryBudget(ratio=0.5, min_per_s=0.0)
    assert allowed(budget, 0.0, 100) == 0
    for _ in range(4):
        budget.record_first(0.0)
    assert allowed(budget, 0.0, 100) == 2


def test_window_slides() -> None:
    budget = RetryBudget(ratio=0.0, min_per_s=1.0, window_s=10.0)
    assert allowed(budget, 0.0, 100) == 10
    assert allowed(budget, 9.9, 100) == 0
    # One-second buckets: second 0 leaves the window as second 10 begins.
    assert allowed(budget, 10.0, 100) == 10
    assert allowed(budget, 15.5, 100) == 0
    assert allowed(budget, 19.99, 100) == 0
    assert allowed(budget, 20.0, 100) == 10
    assert allowed(budget, 100.0, 100) == 10


def test_first_attempts_expire_with_the_window() -> None:
    budget = RetryBudget(ratio=1.0, min_per_s=0.0, window_s=10.0)
    for _ in range(5):
        budget.record_first(0.0)
    assert allowed(budget, 11.0, 100) == 0
