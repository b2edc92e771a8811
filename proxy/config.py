"""The typed, frozen config objects and their defaults; `ConfigError`.

Owns the shape of every setting. Reading and validating the file is `configfile`'s job.
Imports nothing of the rest of the app; everything else receives these objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .caps import Caps



@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 8 * 1024 * 1024
    drain_delay_s: float = 5.0
    shutdown_grace_s: float = 30.0
    admin_key: str = ""
    # A new connection's first request head must be complete this long after it was accepted.
    header_timeout_s: float = 10.0
    # An idle keep-alive connection closes this long after its last answer, unless the next
    # request's head is complete by then. Above common load balancers' 60 s idle timeout, so
    # they close first and never reuse a connection the gateway is closing.
    keepalive_s: float = 75.0
    # A request body may pause this long between two reads (nginx's client_body_timeout): a
    # body trickled slower than that ends in 408, so it cannot hold a request open for ever.
    body_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""
    timeout_ms: int = 100
    on_error: str = "fail_open"  # fail_open | fail_closed


@dataclass(frozen=True, slots=True)
class KeyConfig:
    name: str
    key_sha256: str  # lower-case hex; computed from `key` when the file gives plaintext
    group: str = "default"
    models: frozenset[str] | None = None  # None: every model
    limits: Limits = Limits()
    budget_tokens: int | None = None
    guardrails: tuple[str, ...] = ()  # names in Config.guardrails (SPEC §11)
    budget_nano_usd: int | None = None  # `budget_usd` in nano-dollars (SPEC §12)
    budget_period: str = "total"  # total | daily | weekly | monthly, UTC


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 5.0
    first_byte_s: float = 60.0
    idle_s: float = 60.0
    total_s: float = 600.0


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 60.0
    open_s: float = 30.0
    max_open_s: float = 300.0
    half_open_probes: int = 1


@dataclass(frozen=True, slots=True)
class AccountConfig:
    name: str
    api_key: str = ""
    weight: float = 1.0
    priority: int = 0
    max_concurrency: int | None = None  # None: no cap
    limits: Limits = Limits()
    groups: frozenset[str] | None = None  # None: every group


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    type: str  # openai | anthropic | azure | gemini | mock (SPEC §9)
    base_url: str = ""  # without a trailing slash; empty for mock
    timeouts: Timeouts = Timeouts()
    breaker: BreakerConfig = BreakerConfig()
    accounts: tuple[AccountConfig, ...] = ()
    latency_ms: float = 0.0  # mock only
    chunk_delay_ms: float = 0.0  # mock only
    imitate: str = "openai"  # mock only: the protocol it answers in (openai | anthropic)
    anthropic_version: str = "2023-06-01"  # anthropic only
    anthropic_beta: tuple[str, ...] = ()  # anthropic only: sent on every request
    api_version: str = ""  # azure only: "v1" or a dated api-version
    # azure only: whether the api-version takes `stream_options` (None: v1 and 2024-10-21 on do)
    supports_stream_usage: bool | None = None


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str  # the name the upstream knows the model by


@dataclass(frozen=True, slots=True)
class Price:
    """A model's prices in pico-dollars per token, i.e. micro-dollars per million tokens: the
    file's USD per million tokens × 10^6, exact for up to six decimals."""

    input: int
    output: int
    cached_input: int
    cache_write: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    kind: str = "chat"
    targets: tuple[Target, ...] = ()
    fallbacks: tuple[str, ...] = ()
    limits: Limits = Limits()
    default_max_tokens: int = 1024
    caps: Caps = Caps()  # what the upstream model accepts, read by converters
    guardrails: tuple[str, ...] = ()  # names in Config.guardrails, run with the key's (SPEC §11)
    price: Price | None = None  # None: unpriced (no key with budget_usd may use it)


@dataclass(frozen=True, slots=True)
class StickyConfig:
    enabled: bool = False
    ttl_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    strategy: str = "least_busy"  # least_busy | weighted_random | round_robin
    max_attempts: int = 3
    retry_budget: float = 0.2
    retry_min_per_s: float = 1.0
    sticky: StickyConfig = StickyConfig()


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "info"  # debug | info | warning | error
    access_log: bool = True
    metrics: bool = True  # off only to measure what metrics cost



@dataclass(frozen=True, slots=True)
class GuardrailConfig:
    """A named guardrail (SPEC §11): what it looks for, what it does, in which direction."""

    name: str
    type: str = "pii"  # pii (built-in detectors) | regex (the operator's patterns)
    categories: tuple[str, ...] = ()  # pii: the detectors to run; empty: all of them
    patterns: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # regex: category -> RE2 pattern
    action: str = "block"  # block | redact | log
    apply_to: frozenset[str] = frozenset({"request"})  # request and/or response


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    keys: tuple[KeyConfig, ...] = ()
    providers: Mapping[str, ProviderConfig] = field(default_factory=lambda: MappingProxyType({}))
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))
    routing: RoutingConfig = RoutingConfig()
    logging: LoggingConfig = LoggingConfig()
    guardrails: Mapping[str, GuardrailConfig] = field(default_factory=lambda: MappingProxyType({}))


class ConfigError(Exception):
    """Every problem found in a config file, each as `path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
