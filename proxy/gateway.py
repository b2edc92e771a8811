"""`Gateway`: everything one config builds — key lookup, models, providers, account state.

A reload builds a new Gateway from the old one (account state and unchanged providers carry
over); requests keep the Gateway they started with. Does no request handling itself.
"""

from __future__ import annotations

import hashlib
import logging
import random

from .accounts import Accounts
from .buckets import BucketTables
from .chat_api import CHAT
from .config import Config, KeyConfig, ModelConfig
from .guardrails.rules import Guardrails
from .messages_api import MESSAGES
from .metrics import Metrics
from . import providers
from .ratelimit import Limiter
from .retrybudget import RetryBudget
from .upstream import Provider

log = logging.getLogger("llm_proxy.gateway")


class Gateway:
    def __init__(
        self,
        *,
        config: Config,
        limiter: Limiter,
        divisor: int = 1,
        metrics: Metrics | None = None,
        previous: Gateway | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.limiter = limiter
        self.divisor = divisor
        self.buckets = BucketTables(config, divisor)
        self.keys: dict[str, KeyConfig] = {key.key_sha256: key for key in config.keys}
        self.models: dict[str, ModelConfig] = dict(config.models)
        self.guardrails = Guardrails(config.guardrails)  # compiled per config: a reload recompiles
        # what forward tries per client model, in order: the model, then its fallbacks
        self.routes: dict[str, tuple[ModelConfig, ...]] = {
            m.name: (m, *(config.models[name] for name in m.fallbacks)) for m in config.models.values()
        }
        self.accounts: Accounts = Accounts(
            config=config,
            rng=random.Random(),
            previous=previous.accounts if previous is not None else None,
        )
        routing = config.routing
        same_budget = previous is not None and (
            (previous.config.routing.retry_budget, previous.config.routing.retry_min_per_s)
            == (routing.retry_budget, routing.retry_min_per_s)
        )
        # the recent history carries over a reload unless the budget itself changed
        self.retry_budget: RetryBudget = (
            previous.retry_budget
            if previous is not None and same_budget
            else RetryBudget(ratio=routing.retry_budget, min_per_s=routing.retry_min_per_s)
        )
        old = previous.providers if previous is not None else {}
        self.providers: dict[str, Provider] = {
            name: old[name] if name in old and old[name].config == provider else providers.build(provider, metrics)
            for name, provider in config.providers.items()
        }
        # the providers as each client API's requests reach them (SPEC §10)
        self.surfaces: dict[str, dict[str, Provider]] = {
            api.name: {name: api.adapt(provider, metrics) for name, provider in self.providers.items()}
            for api in (CHAT, MESSAGES)
        }

    def retired_from(self, old: Gateway) -> list[Provider]:
        """The providers of `old` this Gateway no longer uses."""
        kept = {id(provider) for provider in self.providers.values()}
        return [provider for provider in old.providers.values() if id(provider) not in kept]

    def authenticate(self, token: str) -> KeyConfig | None:
        return self.keys.get(hashlib.sha256(token.encode()).hexdigest())

    def models_for(self, key: KeyConfig) -> list[ModelConfig]:
        return [m for m in self.models.values() if key.models is None or m.name in key.models]

    async def probe_quarantined(self) -> None:
        """Lifts the quarantine of every account whose key works again (`GET /models` answers 2xx)."""
        for account in self.accounts.quarantined():
            if await self.providers[account.provider.name].probe(account.config):
                log.info("account %s answers again: quarantine lifted", account.id)
                self.accounts.lift_quarantine(account)

    def refresh_metrics(self, now: float) -> None:
        if self.metrics is None:
            return
        accounts = self.accounts.accounts
        self.metrics.refresh_state(
            inflight=[(a.provider.name, a.config.name, a.inflight) for a in accounts],
            breakers=[(p, a, int(state)) for p, a, state in self.accounts.breaker_states(now)],
            available=[(p, a, 1 if ok else 0) for p, a, ok in self.accounts.availability(now)],
            redis_degraded=self.limiter.degraded,
        )

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()

