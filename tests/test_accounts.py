"""Account state and the scheduling choice, driven by a fake clock and seeded randomness."""

from __future__ import annotations

import json
import random
from collections import Counter
from types import MappingProxyType

import pytest

from proxy import accounts as accounts_module
from proxy.account import Account
from proxy.accounts import Accounts, Attempt, Choice
from proxy.breaker import BreakerState, Outcome
from proxy.config import (
    AccountConfig, BreakerConfig, Config, ModelConfig, ProviderConfig, RoutingConfig,
    StickyConfig, Target, Timeouts,
)
from proxy.faults import Fault, Verdict

OK = Verdict(Fault.NONE)
CALLER = Verdict(Fault.CALLER, reason="upstream 400")
TRANSIENT = Verdict(Fault.TRANSIENT, reason="upstream 503")
HOST_DOWN = Verdict(Fault.TRANSIENT, reason="transient", shared=True)  # refused, reset, 529
QUARANTINE = Verdict(Fault.QUARANTINE, reason="upstream 401")
DISABLE = Verdict(Fault.DISABLE, reason="upstream 402 insufficient_quota")
BREAKER = BreakerConfig(
    consecutive_failures=1, failure_rate=0.5, min_requests=1000, window_s=10.0,
    open_s=30.0, max_open_s=300.0, half_open_probes=1,
)
# Provider breakers that never trip on their own unless a test says so.
LENIENT = BreakerConfig(consecutive_failures=1000, min_requests=1000, open_s=30.0)


def provider(
    name: str, *accounts: AccountConfig, breaker: BreakerConfig = BREAKER
) -> ProviderConfig:
    return ProviderConfig(
        name=name, type="openai", base_url="http://upstream", breaker=breaker,
        timeouts=Timeouts(total_s=100.0), accounts=accounts,
    )


def config(*providers: ProviderConfig, strategy: str = "least_busy", sticky: bool = False,
           targets: tuple[str, ...] | None = None) -> Config:
    names = targets or tuple(p.name for p in providers)
    model = ModelConfig(name="m", targets=tuple(Target(name, f"{name}-model") for name in names))
    return Config(
        providers=MappingProxyType({p.name: p for p in providers}),
        models=MappingProxyType({"m": model}),
        routing=RoutingConfig(strategy=strategy, sticky=StickyConfig(enabled=sticky, ttl_s=100.0)),
    )


class Midpoint(random.Random):
    """Breaker jitter factor exactly 1.0: open times become exact."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def build(
    *accounts: AccountConfig, rng: random.Random | None = None, **options: object
) -> Accounts:
    """Accounts of provider "p" whose breakers open on one failure; the provider's own breaker
    is made lenient so that one account's failure does not block the others."""
    cfg = config(provider("p", *accounts), **options)  # type: ignore[arg-type]
    pool = Accounts(config=cfg, rng=rng or random.Random(1))
    pool.accounts[0].provider_breaker.reconfigure(LENIENT)
    return pool


def pick(
    pool: Accounts, now: float = 0.0, *, group: str = "default",
    tried: tuple[Account, ...] = (), session: str | None = None,
) -> Choice:
    model = pool._config.models["m"]
    return pool.choose(model=model, group=group, tried=tried, session=session, now=now)


def chosen(pool: Accounts, now: float = 0.0, **kwargs: object) -> str | None:
    account = pick(pool, now, **kwargs).account  # type: ignore[arg-type]
    return account.config.name if account is not None else None


def settle(
    pool: Accounts, name: str, verdict: Verdict, now: float = 0.0, **kwargs: object
) -> Attempt:
    """One whole attempt on the named account."""
    account = pool.account(f"p/{name}")
    assert account is not None
    attempt = pool.begin(Choice(account, Target("p", "x"), False, None), now)
    pool.finish(attempt, verdict, now, **kwargs)  # type: ignore[arg-type]
    return attempt


def shares(pool: Accounts, picks: int, concurrency: int = 0) -> Counter[str]:
    """Picks with `concurrency` attempts kept in flight (oldest finishes first)."""
    counts: Counter[str] = Counter()
    inflight: list[Attempt] = []
    for _ in range(picks):
        choice = pick(pool)
        assert choice.account is not None
        counts[choice.account.config.name] += 1
        inflight.append(pool.begin(choice, 0.0))
        if len(inflight) > concurrency:
            pool.finish(inflight.pop(0), OK, 0.0)
    return counts


A, B, C = AccountConfig(name="a"), AccountConfig(name="b"), AccountConfig(name="c")


@pytest.mark.parametrize(
    ("accounts", "group", "expected"),
    [
        ((AccountConfig(name="a", groups=frozenset({"x"})),), "x", "a"),
        ((AccountConfig(name="a", groups=frozenset({"x"})),), "y", None),
        ((AccountConfig(name="a", groups=frozenset({"x"})), B), "y", "b"),
        ((AccountConfig(name="a", groups=frozenset({"x", "y"})),), "y", "a"),
    ],
)
def test_groups(accounts: tuple[AccountConfig, ...], group: str, expected: str | None) -> None:
    assert chosen(build(*accounts), group=group) == expected


def test_lowest_priority_tier_first() -> None:
    pool = build(AccountConfig(name="spare", priority=1), AccountConfig(name="main", priority=0))
    assert {chosen(pool) for _ in range(50)} == {"main"}
    main = pool.account("p/main")
    assert main is not None
    assert chosen(pool, tried=(main,)) == "spare"
    settle(pool, "main", Verdict(Fault.COOLDOWN, until=10.0))
    assert chosen(pool, 5.0) == "spare"
    assert chosen(pool, 10.0) == "main"


def test_tried_accounts_are_skipped() -> None:
    pool = build(A, B)
    a, b = pool.account("p/a"), pool.account("p/b")
    assert a is not None and b is not None
    assert chosen(pool, tried=(a,)) == "b"
    assert pick(pool, tried=(a, b)) == Choice(None, None, False, None)


WEIGHTED = (AccountConfig(name="a", weight=3.0), AccountConfig(name="b", weight=1.0))


@pytest.mark.parametrize(
    ("strategy", "concurrency"),
    [("weighted_random", 0), ("weighted_random", 8), ("least_busy", 0), ("least_busy", 8),
     ("least_busy", 32), ("round_robin", 0), ("round_robin", 8)],
)
def test_weights_set_the_share(strategy: str, concurrency: int) -> None:
    counts = shares(build(*WEIGHTED, strategy=strategy), 4000, concurrency)
    assert counts["a"] / 4000 == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize("strategy", ["weighted_random", "least_busy", "round_robin"])
def test_equal_accounts_share_evenly(strategy: str) -> None:
    counts = shares(build(A, B, C, strategy=strategy), 3000)
    assert all(count / 3000 == pytest.approx(1 / 3, abs=0.03) for count in counts.values())


def test_round_robin_interleaves_by_weight() -> None:
    pool = build(*WEIGHTED, strategy="round_robin")
    assert [chosen(pool) for _ in range(8)] == ["a", "a", "b", "a"] * 2


def test_least_busy_prefers_fewer_inflight_per_weight() -> None:
    pool = build(AccountConfig(name="a", weight=2.0), B)
    begun = [pool.begin(pick(pool), 0.0) for _ in range(30)]
    counts = Counter(attempt.account.config.name for attempt in begun)
    assert counts == {"a": 20, "b": 10}


def test_max_concurrency() -> None:
    pool = build(AccountConfig(name="a", max_concurrency=2))
    first, second = pool.begin(pick(pool), 0.0), pool.begin(pick(pool), 0.0)
    assert pick(pool) == Choice(None, None, False, None)
    pool.finish(first, OK, 0.0)
    pool.finish(first, OK, 0.0)  # twice: counted once
    assert second.account.inflight == 1
    assert chosen(pool) == "a"


@pytest.mark.parametrize(
    ("verdict", "field", "value"),
    [
        (Verdict(Fault.COOLDOWN, until=20.0, reason="upstream 429"), "cooldown_until", 20.0),
        (Verdict(Fault.COOLDOWN, reason="upstream 429"), "cooldown_until", 6.0),
        (QUARANTINE, "quarantined", "upstream 401"),
        (DISABLE, "disabled", "upstream 402 insufficient_quota"),
    ],
)
def test_account_faults_bench_the_account(verdict: Verdict, field: str, value: object) -> None:
    pool = build(A)
    attempt = settle(pool, "a", verdict, 5.0)
    assert getattr(attempt.account, field) == value
    assert attempt.account.last_error == verdict.reason
    assert attempt.account.breaker.state(5.0) is BreakerState.CLOSED  # neither success nor failure
    cooling = value if field == "cooldown_until" else None
    assert pick(pool, 5.5) == Choice(None, None, False, None, cooling_until=cooling)


def test_cooldown_only_extends() -> None:
    pool = build(A)
    settle(pool, "a", Verdict(Fault.COOLDOWN, until=20.0), 0.0)
    settle(pool, "a", Verdict(Fault.COOLDOWN, until=10.0), 1.0)
    assert chosen(pool, 19.0) is None
    assert chosen(pool, 20.0) == "a"


def test_quarantine_is_lifted_by_a_probe() -> None:
    pool = build(A, B)
    settle(pool, "a", QUARANTINE)
    assert [account.id for account in pool.quarantined()] == ["p/a"]
    assert {chosen(pool) for _ in range(20)} == {"b"}
    pool.lift_quarantine(pool.quarantined()[0])
    assert pool.quarantined() == []
    assert {chosen(pool) for _ in range(50)} == {"a", "b"}


@pytest.mark.parametrize(
    ("verdict", "state"),
    [(OK, BreakerState.CLOSED), (CALLER, BreakerState.CLOSED), (TRANSIENT, BreakerState.OPEN),
     (QUARANTINE, BreakerState.CLOSED)],
)
def test_verdicts_reach_the_account_breaker(verdict: Verdict, state: BreakerState) -> None:
    pool = build(A)
    attempt = settle(pool, "a", verdict)
    assert attempt.account.breaker.state(0.0) is state


def test_cancelled_attempt_is_neutral_unless_a_probe() -> None:
    pool = build(A)
    settle(pool, "a", QUARANTINE, cancelled=True)
    account = pool.account("p/a")
    assert account is not None and account.quarantined is None
    assert account.breaker.state(0.0) is BreakerState.CLOSED
    settle(pool, "a", TRANSIENT)
    opens_at = account.breaker.retry_at(0.0)
    assert opens_at is not None
    probe = settle(pool, "a", OK, opens_at, cancelled=True)
    assert probe.account_ticket is not None and probe.account_ticket.probe
    assert account.breaker.state(opens_at) is BreakerState.OPEN


def test_breaker_blocked_and_retry_at() -> None:
    pool = build(A, B, AccountConfig(name="q"))
    settle(pool, "q", QUARANTINE)
    assert chosen(pool) in {"a", "b"}
    settle(pool, "a", TRANSIENT, 0.0)
    choice = pick(pool, 1.0)
    assert choice.account is not None and choice.account.config.name == "b"
    settle(pool, "b", TRANSIENT, 5.0)
    a, b = pool.account("p/a"), pool.account("p/b")
    assert a is not None and b is not None
    a_at, b_at = a.breaker.retry_at(6.0), b.breaker.retry_at(6.0)
    assert a_at is not None and b_at is not None
    assert pick(pool, 6.0) == Choice(None, None, True, min(a_at, b_at))
    # A breaker-blocked account that is also tried no longer counts.
    assert pick(pool, 6.0, tried=(a, b)) == Choice(None, None, False, None)


def test_half_open_with_probe_in_flight_blocks_for_a_second() -> None:
    pool = build(A)
    settle(pool, "a", TRANSIENT)
    account = pool.account("p/a")
    assert account is not None
    opens_at = account.breaker.retry_at(0.0) or 0.0
    probe = pool.begin(pick(pool, opens_at), opens_at)
    choice = pick(pool, opens_at + 0.5)
    assert choice == Choice(None, None, True, opens_at + 0.5 + accounts_module.HALF_OPEN_RETRY_S)
    pool.finish(probe, OK, opens_at + 1.0)
    assert chosen(pool, opens_at + 1.0) == "a"


def test_provider_breaker_counts_every_account_and_blocks_them_all() -> None:
    lenient_accounts = BreakerConfig(consecutive_failures=3, min_requests=1000, open_s=30.0)
    pool = Accounts(
        config=config(provider("p", A, B, breaker=lenient_accounts)), rng=random.Random(1)
    )
    settle(pool, "a", HOST_DOWN, 0.0)
    settle(pool, "b", HOST_DOWN, 0.0)
    settle(pool, "a", HOST_DOWN, 1.0)  # third failure in a row for the provider, not for a or b
    a = pool.account("p/a")
    assert a is not None and a.breaker.state(1.0) is BreakerState.CLOSED
    assert a.provider_breaker.state(1.0) is BreakerState.OPEN
    assert pick(pool, 2.0) == Choice(None, None, True, a.provider_breaker.retry_at(2.0))
    assert ("p", "*", BreakerState.OPEN) in pool.breaker_states(2.0)
    assert ("p", "a", BreakerState.CLOSED) in pool.breaker_states(2.0)
    assert pool.availability(2.0) == [("p", "a", False), ("p", "b", False)]


@pytest.mark.parametrize("strategy", ["least_busy", "round_robin"])
def test_one_accounts_own_faults_never_open_its_providers_breaker(strategy: str) -> None:
    """Only faults of what every account shares count for the provider (SPEC §5): a failing
    account's 5xx, however many and however fast, leave the other accounts serving."""
    breaker = BreakerConfig(consecutive_failures=3, min_requests=5)
    pool = Accounts(config=config(provider("p", A, B, breaker=breaker), strategy=strategy), rng=random.Random(1))
    for i in range(50):
        settle(pool, "a", TRANSIENT, i * 0.01)
    a, b = pool.account("p/a"), pool.account("p/b")
    assert a is not None and b is not None
    assert a.breaker.state(1.0) is BreakerState.OPEN
    assert b.provider_breaker.state(1.0) is BreakerState.CLOSED
    assert [pick(pool, 1.0).account for _ in range(5)] == [b] * 5


@pytest.mark.parametrize(
    ("provider_fails_at", "retry_at"),
    [(None, 30.0), (5.0, 35.0), (35.0, 65.0)],
    ids=["earliest-account", "provider-holds-one-account-longer", "provider-holds-both"],
)
def test_retry_at_is_the_earliest_account_and_its_latest_breaker(
    provider_fails_at: float | None, retry_at: float
) -> None:
    pool = build(A, B, rng=Midpoint())
    settle(pool, "a", TRANSIENT, 0.0)  # open until 30
    settle(pool, "b", TRANSIENT, 10.0)  # open until 40
    if provider_fails_at is not None:
        provider_breaker = pool.accounts[0].provider_breaker
        provider_breaker.reconfigure(BREAKER)
        ticket = provider_breaker.enter(provider_fails_at)
        assert ticket is not None
        provider_breaker.record(ticket, Outcome.FAILURE, provider_fails_at)
    assert pick(pool, 11.0 if provider_fails_at is None else provider_fails_at).retry_at == retry_at


def test_second_target_serves_when_the_first_cannot() -> None:
    cfg = config(provider("p", A), provider("q", AccountConfig(name="z")))
    pool = Accounts(config=cfg, rng=random.Random(1))
    choice = pick(pool)
    assert choice.account is not None and choice.account.id == "p/a"
    assert choice.target == Target("p", "p-model")
    settle(pool, "a", QUARANTINE)
    choice = pick(pool)
    assert choice.account is not None and choice.account.id == "q/z"
    assert choice.target == Target("q", "q-model")


def test_account_listed_under_two_targets_counts_once() -> None:
    pool = Accounts(config=config(provider("p", A), targets=("p", "p")), rng=random.Random(1))
    assert len(pool._routes["m"]) == 1


def test_sticky_session_holds_and_moves_when_unhealthy() -> None:
    pool = build(A, B, strategy="round_robin", sticky=True)
    assert chosen(pool, session="s") == "a"
    assert [chosen(pool, session="s") for _ in range(5)] == ["a"] * 5
    assert [chosen(pool) for _ in range(2)] == ["b", "a"]  # no session: round robin
    settle(pool, "a", Verdict(Fault.COOLDOWN, until=10.0), 1.0)
    assert chosen(pool, 2.0, session="s") == "b"
    assert chosen(pool, 10.0, session="s") == "b"  # re-pinned; a's recovery does not move it back
    assert chosen(pool, 50.0, session="t") != chosen(pool, 50.0, session="u")


def test_sticky_session_expires() -> None:
    pool = build(A, B, strategy="round_robin", sticky=True)
    assert chosen(pool, 0.0, session="s") == "a"
    assert chosen(pool, 99.0, session="s") == "a"  # each use renews the TTL
    assert chosen(pool, 198.0, session="s") == "a"
    assert chosen(pool, 298.0, session="s") == "b"  # past the TTL: chosen afresh


def test_sticky_session_follows_priority_back() -> None:
    pool = build(AccountConfig(name="main"), AccountConfig(name="spare", priority=1), sticky=True)
    settle(pool, "main", Verdict(Fault.COOLDOWN, until=10.0))
    assert chosen(pool, 1.0, session="s") == "spare"
    assert chosen(pool, 10.0, session="s") == "main"


def test_sticky_disabled_ignores_sessions() -> None:
    pool = build(A, B, strategy="round_robin")
    assert [chosen(pool, session="s") for _ in range(4)] == ["a", "b", "a", "b"]


def test_sticky_sessions_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts_module, "MAX_SESSIONS", 3)
    pool = build(A, B, sticky=True)
    for session in ["s1", "s2", "s3", "s1", "s4"]:
        chosen(pool, session=session)
    assert list(pool._sessions) == ["s3", "s1", "s4"]


EXHAUSTED = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "10s",
             "x-ratelimit-remaining-tokens": "5000"}


def test_accounts_with_headroom_come_first() -> None:
    pool = build(A, B)
    settle(pool, "a", OK, 0.0, headers=EXHAUSTED)
    a = pool.account("p/a")
    assert a is not None and (a.remaining_requests, a.remaining_tokens) == (0, 5000)
    assert {chosen(pool, 1.0) for _ in range(30)} == {"b"}
    b = pool.account("p/b")
    assert b is not None
    assert chosen(pool, 1.0, tried=(b,)) == "a"  # still used when it is the only one
    assert {chosen(pool, 10.0) for _ in range(30)} == {"a", "b"}
    settle(pool, "a", OK, 2.0, headers={"x-ratelimit-remaining-requests": "7"})
    assert {chosen(pool, 2.0) for _ in range(30)} == {"a", "b"}


def test_begin_needs_an_account() -> None:
    with pytest.raises(ValueError):
        build(A).begin(Choice(None, None, False, None), 0.0)


def test_reload_carries_state_over() -> None:
    old = build(A, B, AccountConfig(name="gone"), AccountConfig(name="q"), AccountConfig(name="d"))
    settle(old, "a", TRANSIENT, 0.0)
    settle(old, "b", Verdict(Fault.COOLDOWN, until=50.0), 0.0)
    settle(old, "q", QUARANTINE, 0.0)
    settle(old, "d", DISABLE, 0.0)
    b = old.account("p/b")
    assert b is not None
    in_flight = old.begin(Choice(b, Target("p", "x"), False, None), 1.0)
    a = old.account("p/a")
    assert a is not None
    opens_at = a.breaker.retry_at(1.0)
    provider_breaker = a.provider_breaker
    weighted = AccountConfig(name="a", weight=5.0)
    new_config = config(provider("p", weighted, B, AccountConfig(name="q"),
                                 AccountConfig(name="d"), C))
    new = Accounts(config=new_config, rng=random.Random(2), previous=old)
    assert new.account("p/a") is a and a.config is weighted
    assert a.breaker.retry_at(1.0) == opens_at
    assert a.provider_breaker is provider_breaker
    assert new.account("p/b") is b and b.cooldown_until == 50.0 and b.inflight == 1
    assert new.account("p/gone") is None
    assert new.quarantined() == []
    assert new.account("p/d").disabled is None  # type: ignore[union-attr]  # lifted like quarantine
    fresh = new.account("p/c")
    assert fresh is not None and fresh.breaker.state(1.0) is BreakerState.CLOSED
    new.finish(in_flight, OK, 2.0)  # an attempt begun before the reload settles on the live state
    assert b.inflight == 0
    assert {chosen(new, 3.0) for _ in range(40)} == {"q", "c", "d"}


def test_snapshot_is_plain_json() -> None:
    pool = build(A, AccountConfig(name="b", max_concurrency=4))
    settle(pool, "a", TRANSIENT, 0.0, headers=EXHAUSTED)
    settle(pool, "b", Verdict(Fault.COOLDOWN, until=30.0, reason="upstream 429"), 0.0)
    b = pool.account("p/b")
    assert b is not None
    pool.begin(Choice(b, Target("p", "x"), False, None), 0.0)
    a = pool.account("p/a")
    assert a is not None
    retry_in = (a.breaker.retry_at(10.0) or 0.0) - 10.0
    rows = {row["account"]: row for row in json.loads(json.dumps(pool.snapshot(10.0)))}
    assert rows["a"] == {
        "provider": "p", "account": "a", "breaker": "open", "retry_at": pytest.approx(retry_in),
        "provider_breaker": "closed", "provider_retry_at": None, "cooldown_until": None,
        "quarantined": None, "disabled": None, "inflight": 0, "max_concurrency": None,
        "last_error": "upstream 503", "remaining_requests": 0, "remaining_tokens": 5000,
        "available": False,
    }
    assert rows["b"]["cooldown_until"] == pytest.approx(20.0)
    assert rows["b"]["inflight"] == 1 and rows["b"]["max_concurrency"] == 4
    assert rows["b"]["breaker"] == "closed" and rows["b"]["available"] is False
    assert pool.snapshot(31.0)[1]["available"] is True
