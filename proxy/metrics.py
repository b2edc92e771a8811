"""Prometheus metrics of SPEC §7 on an injected registry, and the cheap calls that record them.

Labels come only from config names and small fixed sets, never keys or free text. Labelled
children are cached per label tuple, so recording is a dict lookup and an add. State gauges
(breakers, availability, in-flight, Redis) are refreshed from the live state, not per request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

# LLM latencies: sub-millisecond gateway overhead up to ten-minute generations.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1,
)

StateRow = tuple[str, str, float]
REJECTION_SERIES = (
    ("key", ("rpm", "tpm", "concurrency", "budget")),
    ("model", ("rpm", "tpm", "concurrency")),
    ("account", ("rpm", "tpm", "concurrency")),
)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = _cached(Counter(
            "llm_proxy_requests_total", "Client requests by outcome.",
            ("api", "model", "key", "status", "error_type"), registry=registry,
        ))
        self.duration = _cached(Histogram(
            "llm_proxy_request_duration_seconds", "Client request duration, to the last byte.",
            ("api", "model", "stream"), buckets=DURATION_BUCKETS, registry=registry,
        ))
        self.ttft = _cached(Histogram(
            "llm_proxy_time_to_first_token_seconds",
            "From request arrival to the first byte (JSON) or first event (SSE) sent.",
            ("api", "model", "provider"), buckets=TTFT_BUCKETS, registry=registry,
        ))
        self.overhead = Histogram(
            "llm_proxy_overhead_seconds",
            "Time spent in the gateway itself: request duration minus time waiting on upstreams.",
            buckets=OVERHEAD_BUCKETS, registry=registry,
        )
        self.upstream_requests = _cached(Counter(
            "llm_proxy_upstream_requests_total", "Upstream attempts by outcome.",
            ("provider", "account", "outcome"), registry=registry,
        ))
        self.upstream_duration = _cached(Histogram(
            "llm_proxy_upstream_duration_seconds", "Upstream attempt duration.",
            ("provider",), buckets=DURATION_BUCKETS, registry=registry,
        ))
        self.tokens = _cached(Counter(
            "llm_proxy_tokens_total", "Tokens used, from upstream usage reports.",
            ("api", "model", "key", "type"), registry=registry,
        ))
        self.cost = _cached(Counter(
            "llm_proxy_cost_usd", "Spend in USD at the models' prices, from settled usage.",
            ("model", "key"), registry=registry,
        ))
        self.rejections = _cached(Counter(
            "llm_proxy_ratelimit_rejections_total", "Requests refused by a rate limit or budget.",
            ("scope", "dimension"), registry=registry,
        ))
        self.retries = _cached(Counter(
            "llm_proxy_retries_total", "Attempts made after a failed one, by what failed.",
            ("provider", "reason"), registry=registry,
        ))
        self.fallbacks = _cached(Counter(
            "llm_proxy_fallbacks_total", "Requests served by trying a fallback model.",
            ("model", "fallback"), registry=registry,
        ))
        self.guardrail_findings = _cached(Counter(
            "llm_proxy_guardrail_findings_total", "Guardrail findings, by guardrail, category and action.",
            ("guardrail", "category", "action"), registry=registry,
        ))
        self._add_conversion_counters(registry)
        for scope, dimensions in REJECTION_SERIES:
            for dimension in dimensions:  # present at 0 from the start, so rate() has data
                self.rejections((scope, dimension))
        self._add_state_gauges(registry)

    def _add_conversion_counters(self, registry: CollectorRegistry) -> None:
        """What converting to a provider's protocol dropped, repaired or did not know (SPEC §9)."""
        self.conversion_dropped = _cached(Counter(
            "llm_proxy_conversion_dropped_params", "Request fields the upstream's protocol lacks, not sent.",
            ("provider", "param"), registry=registry,
        ))
        self.conversion_repairs = _cached(Counter(
            "llm_proxy_conversion_repairs", "Request parts repaired so the upstream accepts them.",
            ("provider", "kind"), registry=registry,
        ))
        self.conversion_unknown = _cached(Counter(
            "llm_proxy_conversion_unknown_values", "Answer values with no OpenAI form, mapped to a default.",
            ("provider", "field"), registry=registry,
        ))
        self.conversion_dropped_blocks = _cached(Counter(
            "llm_proxy_conversion_dropped_blocks", "Answer content blocks with no OpenAI form, left out.",
            ("provider", "type"), registry=registry,
        ))

    def _add_state_gauges(self, registry: CollectorRegistry) -> None:
        """Gauges set from the live state by `refresh_state`, not per request."""
        self._shown: dict[Gauge, set[tuple[str, str]]] = {}
        # With several workers (multiprocess mode) each holds its own breakers and in-flight
        # counts: in-flight adds up, a breaker shows its worst state, availability its best.
        self._inflight = Gauge(
            "llm_proxy_inflight_requests", "Upstream requests in flight per account.",
            ("provider", "account"), registry=registry, multiprocess_mode="livesum",
        )
        self._breaker = Gauge(
            "llm_proxy_breaker_state", "0 closed, 1 half-open, 2 open; account=\"*\" is the provider's.",
            ("provider", "account"), registry=registry, multiprocess_mode="livemax",
        )
        self._available = Gauge(
            "llm_proxy_account_available", "1 when the account could take a request now.",
            ("provider", "account"), registry=registry, multiprocess_mode="livemax",
        )
        self._redis_degraded = Gauge(
            "llm_proxy_redis_degraded", "1 while Redis is unreachable.", registry=registry,
            multiprocess_mode="livemax",
        )

    def exposition(self) -> bytes:
        """The text format; under several workers, the sum over all of them."""
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    def record_request(
        self, *, api: str, model: str, key: str, status: int, error_type: str, stream: bool,
        duration_s: float, upstream_s: float,
    ) -> None:
        self.requests((api, model, key, str(status), error_type)).inc()
        self.duration((api, model, "true" if stream else "false")).observe(duration_s)
        self.overhead.observe(max(0.0, duration_s - upstream_s))

    def record_attempt(self, *, provider: str | None, account: str | None, outcome: str, duration_s: float) -> None:
        self.upstream_requests((provider or "", account or "", outcome)).inc()
        self.upstream_duration((provider or "",)).observe(duration_s)

    def record_tokens(
        self, *, api: str, model: str, key: str, prompt: int | None, completion: int | None
    ) -> None:
        if prompt:
            self.tokens((api, model, key, "prompt")).inc(prompt)
        if completion:
            self.tokens((api, model, key, "completion")).inc(completion)

    def refresh_state(
        self, *, inflight: Iterable[StateRow], breakers: Iterable[StateRow],
        available: Iterable[StateRow], redis_degraded: bool,
    ) -> None:
        """Sets the state gauges from a snapshot of the live state (cheap; runs per scrape)."""
        for gauge, rows in ((self._inflight, inflight), (self._breaker, breakers), (self._available, available)):
            seen = set()
            for provider, account, value in rows:
                gauge.labels(provider, account).set(value)
                seen.add((provider, account))
            for gone in self._shown.get(gauge, set()) - seen:  # accounts a reload removed
                gauge.remove(*gone)
            self._shown[gauge] = seen
        self._redis_degraded.set(1 if redis_degraded else 0)


def _cached(metric: Any) -> Callable[[tuple[str, ...]], Any]:
    """`metric.labels(*values)`, memoised: the label tuples are few and long-lived."""
    children: dict[tuple[str, ...], Any] = {}

    def child(values: tuple[str, ...]) -> Any:
        found = children.get(values)
        if found is None:
            found = children[values] = metric.labels(*values)
        return found

    return child
