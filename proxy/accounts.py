"""Runtime state of every upstream account and provider, and the choice of one per attempt.

Owns the pool across reloads, the breakers, sticky sessions and the routing strategies of SPEC §5
(one account's health and headroom: `proxy.account`). Pure: takes `now`; must not do I/O or
import aiohttp/redis. Fallback models are the pipeline's business (one choose() per model).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Sequence

from .account import Account
from .breaker import Breaker, BreakerState, Outcome, Ticket
from .config import AccountConfig, Config, ModelConfig, ProviderConfig, Target
from .faults import Fault, Verdict, read_headroom

# A probe is only declared hung once the pipeline's own total timeout must have ended it.
PROBE_GRACE_S = 5.0
# Sticky sessions are a cache: bounded so that a client inventing session ids cannot grow it.
MAX_SESSIONS = 100_000
# A half-open breaker whose probe slots are taken has no "opens at"; look again this much later.
HALF_OPEN_RETRY_S = 1.0

# Caller faults prove the upstream works; account faults say nothing about it (NEUTRAL).
_OUTCOMES = {
    Fault.NONE: Outcome.SUCCESS, Fault.CALLER: Outcome.SUCCESS, Fault.TRANSIENT: Outcome.FAILURE,
}

Candidate = tuple[Account, Target]


@dataclass(slots=True)
class Choice:
    account: Account | None
    target: Target | None
    breaker_blocked: bool  # a breaker excluded an otherwise eligible account
    retry_at: float | None  # when blocked: the earliest time such an account may pass again
    cooling_until: float | None = None  # the earliest end of a cooldown that excluded an account


@dataclass(slots=True, eq=False)
class Attempt:
    account: Account
    target: Target
    account_breaker: Breaker
    provider_breaker: Breaker
    account_ticket: Ticket | None
    provider_ticket: Ticket | None
    started: float
    done: bool = False


class Accounts:
    """Every account of a config. With `previous` (a reload), accounts and provider breakers that
    still exist keep their state and identity; quarantine and disabling are lifted. `previous` is spent."""

    def __init__(
        self, *, config: Config, rng: random.Random, previous: Accounts | None = None
    ) -> None:
        self._config = config
        self._rng = rng
        old_accounts = previous._by_id if previous is not None else {}
        old_breakers = previous._provider_breakers if previous is not None else {}
        self._provider_breakers: dict[str, Breaker] = {}
        self._by_id: dict[str, Account] = {}
        by_provider: dict[str, list[Account]] = {}
        for provider in config.providers.values():
            provider_breaker = self._breaker(provider, old_breakers.get(provider.name))
            self._provider_breakers[provider.name] = provider_breaker
            for account_config in provider.accounts:
                account = self._account(provider, account_config, provider_breaker, old_accounts)
                self._by_id[account.id] = account
                by_provider.setdefault(provider.name, []).append(account)
        self._routes = {name: _route(model, by_provider) for name, model in config.models.items()}
        self._by_provider = by_provider
        self._sessions: OrderedDict[str, tuple[str, float]] = (
            previous._sessions if previous is not None else OrderedDict()
        )
        strategies: dict[str, Callable[[Sequence[Candidate]], Candidate]] = {
            "least_busy": self._least_busy,
            "weighted_random": self._weighted_random,
            "round_robin": self._round_robin,
        }
        self._pick = strategies.get(config.routing.strategy, self._least_busy)

    @property
    def accounts(self) -> tuple[Account, ...]:
        return tuple(self._by_id.values())

    def account(self, account_id: str) -> Account | None:
        return self._by_id.get(account_id)

    def choose(
        self, *, model: ModelConfig, group: str, tried: Collection[Account], session: str | None,
        now: float,
    ) -> Choice:
        route = self._routes.get(model.name)
        if route is None:
            route = _route(model, self._by_provider)
        tier, blocked_at = self._best_tier(route, group, tried, now)
        blocked = blocked_at is not None
        if not tier:
            cooling = [a.cooldown_until for a, _ in route if a.cooldown_until > now and a not in tried]
            return Choice(
                account=None, target=None, breaker_blocked=blocked, retry_at=blocked_at,
                cooling_until=min(cooling) if cooling else None,
            )
        account, target = self._sticky_or_pick(tier, session, now)
        return Choice(account=account, target=target, breaker_blocked=blocked, retry_at=blocked_at)

    def begin(self, choice: Choice, now: float) -> Attempt:
        """Take the chosen account. Call it right after choose(), with no await in between:
        a breaker that refuses here (slot taken meanwhile) lets the attempt through unrecorded."""
        account, target = choice.account, choice.target
        if account is None or target is None:
            raise ValueError("begin() needs a Choice with an account")
        account.inflight += 1
        return Attempt(
            account=account, target=target, account_breaker=account.breaker,
            provider_breaker=account.provider_breaker, account_ticket=account.breaker.enter(now),
            provider_ticket=account.provider_breaker.enter(now), started=now,
        )

    def finish(
        self, attempt: Attempt, verdict: Verdict, now: float, *, cancelled: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Settle an attempt once (later calls do nothing). A cancelled attempt (the client went
        away) says nothing about the account: its verdict is ignored, a probe counts as failed."""
        if attempt.done:
            return
        attempt.done = True
        account = attempt.account
        account.inflight = max(0, account.inflight - 1)
        headroom = read_headroom(headers) if headers is not None else None
        if headroom is not None:
            account.record_headroom(headroom, now)
        outcome = _OUTCOMES.get(verdict.fault, Outcome.NEUTRAL)
        if not cancelled:
            account.apply_fault(verdict, now)
        _settle(attempt.account_breaker, attempt.account_ticket, outcome, cancelled, now)
        # One account's failures say nothing of its provider's other accounts (SPEC §5).
        shared = outcome if outcome is not Outcome.FAILURE or verdict.shared else Outcome.NEUTRAL
        _settle(attempt.provider_breaker, attempt.provider_ticket, shared, cancelled, now)

    def lift_quarantine(self, account: Account) -> None:
        account.quarantined = None

    def quarantined(self) -> list[Account]:
        return [account for account in self._by_id.values() if account.quarantined is not None]

    def breaker_states(self, now: float) -> list[tuple[str, str, BreakerState]]:
        """(provider, account, state) per account, and per provider with account "*"."""
        providers = self._provider_breakers.items()
        states = [(name, "*", breaker.state(now)) for name, breaker in providers]
        states.extend(
            (account.provider.name, account.config.name, account.breaker.state(now))
            for account in self._by_id.values()
        )
        return states

    def availability(self, now: float) -> list[tuple[str, str, bool]]:
        return [
            (account.provider.name, account.config.name, account.available(now))
            for account in self._by_id.values()
        ]

    def snapshot(self, now: float) -> list[dict[str, object]]:
        """Per account, JSON-ready; times are seconds from `now` (None when not pending)."""
        return [account.snapshot(now) for account in self._by_id.values()]

    def _breaker(self, provider: ProviderConfig, old: Breaker | None) -> Breaker:
        probe_timeout_s = provider.timeouts.total_s + PROBE_GRACE_S
        if old is None:
            return Breaker(config=provider.breaker, rng=self._rng, probe_timeout_s=probe_timeout_s)
        old.reconfigure(provider.breaker, probe_timeout_s=probe_timeout_s)
        return old

    def _account(
        self, provider: ProviderConfig, config: AccountConfig, provider_breaker: Breaker,
        old_accounts: Mapping[str, Account],
    ) -> Account:
        old = old_accounts.get(f"{provider.name}/{config.name}")
        if old is None:
            breaker = self._breaker(provider, None)
            return Account(
                provider=provider, config=config, breaker=breaker, provider_breaker=provider_breaker
            )
        # Reuse the object: attempts in flight across the reload then settle on the live state.
        old.provider, old.config, old.provider_breaker = provider, config, provider_breaker
        old.breaker = self._breaker(provider, old.breaker)
        # A reload is how an operator says "fixed": new key, topped-up credit.
        old.quarantined = old.disabled = None
        return old

    def _best_tier(
        self, route: Sequence[Candidate], group: str, tried: Collection[Account], now: float
    ) -> tuple[list[Candidate], float | None]:
        """The candidates of the best rank (priority, then headroom), and when a breaker-blocked
        account may pass again (None when no breaker excluded anyone)."""
        best: tuple[int, bool] | None = None
        tier: list[Candidate] = []
        blocked_at: float | None = None
        for candidate in route:
            account = candidate[0]
            groups = account.config.groups
            if (groups is not None and group not in groups) or account in tried:
                continue
            if not account.healthy(now):
                continue
            if not (account.breaker.can_pass(now) and account.provider_breaker.can_pass(now)):
                at = _passes_again_at(account, now)
                blocked_at = at if blocked_at is None else min(blocked_at, at)
                continue
            rank = (account.config.priority, not account.has_headroom(now))
            if best is None or rank < best:
                best, tier = rank, [candidate]
            elif rank == best:
                tier.append(candidate)
        return tier, blocked_at

    def _sticky_or_pick(
        self, tier: Sequence[Candidate], session: str | None, now: float
    ) -> Candidate:
        """Sticky sessions hold within the best tier only, so a session follows the operator's
        priorities back once a better tier recovers. Each use renews the session's TTL."""
        sticky = self._config.routing.sticky
        if not sticky.enabled or session is None:
            return self._pick(tier)
        entry = self._sessions.get(session)
        chosen: Candidate | None = None
        if entry is not None and entry[1] > now:
            chosen = next((candidate for candidate in tier if candidate[0].id == entry[0]), None)
        if chosen is None:
            chosen = self._pick(tier)
        self._sessions[session] = (chosen[0].id, now + sticky.ttl_s)
        self._sessions.move_to_end(session)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return chosen

    def _least_busy(self, tier: Sequence[Candidate]) -> Candidate:
        """Fewest in flight per unit of weight; ties (e.g. an idle gateway) go weighted-random,
        so sequential traffic also follows the weights."""
        best_load = math.inf
        best: list[Candidate] = []
        for candidate in tier:
            weight = candidate[0].config.weight
            load = candidate[0].inflight / weight if weight > 0 else math.inf
            if load < best_load or not best:
                best_load, best = load, [candidate]
            elif load == best_load:
                best.append(candidate)
        return best[0] if len(best) == 1 else self._weighted_random(best)

    def _weighted_random(self, tier: Sequence[Candidate]) -> Candidate:
        point = self._rng.random() * sum(candidate[0].config.weight for candidate in tier)
        for candidate in tier:
            point -= candidate[0].config.weight
            if point < 0:
                return candidate
        return tier[-1]

    def _round_robin(self, tier: Sequence[Candidate]) -> Candidate:
        """Smooth weighted round robin (nginx): weight-proportional and evenly interleaved."""
        total = 0.0
        best = tier[0]
        for candidate in tier:
            account = candidate[0]
            account.rr_credit += account.config.weight
            total += account.config.weight
            if account.rr_credit > best[0].rr_credit:
                best = candidate
        best[0].rr_credit -= total
        return best


def _route(
    model: ModelConfig, by_provider: Mapping[str, Sequence[Account]]
) -> tuple[Candidate, ...]:
    """The model's accounts in target order; an account listed under two targets keeps the first."""
    seen: set[str] = set()
    route: list[Candidate] = []
    for target in model.targets:
        for account in by_provider.get(target.provider, ()):
            if account.id not in seen:
                seen.add(account.id)
                route.append((account, target))
    return tuple(route)


def _passes_again_at(account: Account, now: float) -> float:
    """The account passes once every breaker that refuses it does: the latest of their times."""
    at = now
    for breaker in (account.breaker, account.provider_breaker):
        if not breaker.can_pass(now):
            opens_at = breaker.retry_at(now)
            at = max(at, opens_at if opens_at is not None else now + HALF_OPEN_RETRY_S)
    return at


def _settle(
    breaker: Breaker, ticket: Ticket | None, outcome: Outcome, cancelled: bool, now: float
) -> None:
    if ticket is None:
        return
    if cancelled:
        outcome = Outcome.FAILURE if ticket.probe else Outcome.NEUTRAL
    breaker.record(ticket, outcome, now)
