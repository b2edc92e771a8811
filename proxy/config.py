"""The config file: `${VAR}` substitution, strict validation, typed frozen objects.

Owns the shape of every setting and its defaults. Reports every problem at once, each with its
path. Imports nothing of the rest of the app; everything else receives these objects.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Collection, Mapping, Sequence, TypeVar, cast
from urllib.parse import urlsplit

import yaml


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
    type: str  # openai | mock
    base_url: str = ""  # without a trailing slash; empty for mock
    timeouts: Timeouts = Timeouts()
    breaker: BreakerConfig = BreakerConfig()
    accounts: tuple[AccountConfig, ...] = ()
    latency_ms: float = 0.0  # mock only
    chunk_delay_ms: float = 0.0  # mock only


@dataclass(frozen=True, slots=True)
class Target:
    provider: str
    model: str  # the name the upstream knows the model by


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    kind: str = "chat"
    targets: tuple[Target, ...] = ()
    fallbacks: tuple[str, ...] = ()
    limits: Limits = Limits()
    default_max_tokens: int = 1024


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


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    keys: tuple[KeyConfig, ...] = ()
    providers: Mapping[str, ProviderConfig] = field(default_factory=lambda: MappingProxyType({}))
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))
    routing: RoutingConfig = RoutingConfig()
    logging: LoggingConfig = LoggingConfig()


class ConfigError(Exception):
    """Every problem found in a config file, each as `path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: str) -> Config:
    """Reads the file at `path` and parses it with the process environment."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError([f"{path}: cannot read the file ({reason})"]) from exc
    return parse_config(text, os.environ)


def parse_config(text: str, env: Mapping[str, str]) -> Config:
    """Substitutes, parses and validates a config file; raises ConfigError with every problem."""
    substituted, problems = _substitute(text, env)
    data, yaml_problems = _load_yaml(substituted)
    problems += yaml_problems
    if not isinstance(data, dict):
        raise ConfigError(problems)
    config = _build(data, "", problems, _read_config)
    if problems:
        raise ConfigError(problems)
    return config


def substitute_env(text: str, env: Mapping[str, str]) -> str:
    """Replaces `${VAR}` and `${VAR:-default}` outside comment lines; raises ConfigError if unset."""
    result, problems = _substitute(text, env)
    if problems:
        raise ConfigError(problems)
    return result


_REFERENCE = re.compile(r"\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?")


def _substitute(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    problems: list[str] = []
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not line.lstrip().startswith("#"):
            lines[index] = _substitute_line(line, index + 1, env, problems)
    return "\n".join(lines), problems


def _substitute_line(line: str, number: int, env: Mapping[str, str], problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name is None:
            problems.append(f"line {number}: malformed reference; use ${{VAR}} or ${{VAR:-default}}")
        elif default is not None:
            return env.get(name) or default
        elif name in env:
            return env[name]
        else:
            problems.append(f"line {number}: environment variable {name} is not set")
        # Left as written, so an unset secret does not also surface as an empty field.
        return match[0]

    return _REFERENCE.sub(replace, line)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records duplicate keys, of which plain YAML silently keeps the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [key for key, _ in node.value]
        # Merge keys (`<<: *anchor`) may legitimately override; such mappings are not checked.
        if all(isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge" for key in keys):
            seen: set[tuple[str, str]] = set()
            for key in keys:
                if (key.tag, key.value) in seen:
                    self.duplicates.append(f"line {key.start_mark.line + 1}: duplicate key {key.value}")
                seen.add((key.tag, key.value))
        return super().construct_mapping(node, deep)


def _load_yaml(text: str) -> tuple[object, list[str]]:
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f"line {mark.line + 1}" if mark else "top level"
        return None, [f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}"]
    finally:
        loader.dispose()
    problems = loader.duplicates
    if data is None:
        problems.append("top level: the file is empty")
    elif not isinstance(data, dict):
        problems.append("top level: must be a mapping")
    return data, problems


T = TypeVar("T")
D = TypeVar("D")
_Rule = Callable[[Any], "str | None"]  # the problem with a value, or None
_KIND_NAMES: dict[type[object], str] = {
    int: "an integer", float: "a number", str: "a string", bool: "true or false"
}


class _Reader:
    """Reads one mapping found at `path`: typed values, nested readers, and the keys nobody read."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.data: dict[Any, Any] = data if isinstance(data, dict) else {}
        self.read: set[str] = set()
        if data is not None and not isinstance(data, dict):
            self.report("", "must be a mapping")

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def report(self, key: str, message: str) -> None:
        self.problems.append(f"{self.at(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def names(self, key: str) -> frozenset[str]:
        value = self.data.get(key)
        return frozenset(k for k in value if isinstance(k, str)) if isinstance(value, dict) else frozenset()

    def get(
        self, key: str, kind: type[T], default: D, rule: _Rule | None = None, required: bool = False
    ) -> T | D:
        """The value at `key` as `kind`; `default` when absent, null, or wrong (then reported)."""
        self.read.add(key)
        value = self.data.get(key)
        if value is None and kind is str and key in self.data:
            value = ""  # `key: ${VAR:-}` reads as YAML null; for a string that means empty
        if value is None:
            if required:
                self.report(key, "is required")
            return default
        converted = _convert(value, kind)
        if converted is None:
            self.report(key, f"must be {_KIND_NAMES[kind]}")
            return default
        problem = rule(converted) if rule else None
        if problem:
            self.report(key, problem)
            return default
        return converted

    def strings(self, key: str, rule: _Rule | None = None) -> tuple[str, ...] | None:
        """A list of distinct strings, in file order; None when absent."""
        value = self._container(key, list, "")
        if value is None:
            return None
        found: list[str] = []
        for index, item in enumerate(value):
            if not isinstance(item, str):
                problem: str | None = "must be a string"
            else:
                problem = "duplicate entry" if item in found else rule(item) if rule else None
            if problem:
                self.report(f"{key}[{index}]", problem)
            else:
                found.append(item)
        return tuple(found)

    def section(self, key: str, build: Callable[[_Reader], T]) -> T:
        self.read.add(key)
        return _build(self.data.get(key), self.at(key), self.problems, build)

    def each(self, key: str, build: Callable[[_Reader], T], least: str = "") -> list[T]:
        items = self._container(key, list, least) or []
        return [_build(item, self.at(f"{key}[{i}]"), self.problems, build) for i, item in enumerate(items)]

    def named(self, key: str, build: Callable[[str, _Reader], T], least: str = "") -> dict[str, T]:
        built: dict[str, T] = {}
        for name, item in (self._container(key, dict, least) or {}).items():
            if isinstance(name, str) and name:
                built[name] = _build(item, self.at(f"{key}.{name}"), self.problems, partial(build, name))
            else:
                self.report(key, f"name {name!r} must be a non-empty string")
        return built

    def flag_repeats(self, key: str, values: Sequence[str], field: str, what: str) -> None:
        """Reports each non-empty value of list `key` that an earlier item already has."""

        def where(index: int) -> str:
            return self.at(f"{key}[{index}]" + (f".{field}" if field else ""))

        first: dict[str, int] = {}
        for index, value in enumerate(values):
            if value in first:
                self.problems.append(f"{where(index)}: same {what} as {where(first[value])}")
            elif value:
                first[value] = index

    def flag_unknown(self) -> None:
        for key in self.data:
            if key not in self.read:
                self.report(str(key), "unknown key")

    def _container(self, key: str, kind: type[list[Any]] | type[dict[Any, Any]], least: str) -> Any:
        """The list or mapping at `key` (None when absent or wrong); reports one that must not be empty."""
        self.read.add(key)
        value = self.data.get(key)
        if value is not None and not isinstance(value, kind):
            self.report(key, "must be a list" if kind is list else "must be a mapping")
            return None
        if least and not value:
            self.report(key, f"at least one {least} is required")
        return value


def _build(data: object, path: str, problems: list[str], build: Callable[[_Reader], T]) -> T:
    reader = _Reader(data, path, problems)
    result = build(reader)
    reader.flag_unknown()
    return result


def _convert(value: object, kind: type[T]) -> T | None:
    """`value` as `kind`, or None when YAML gave another type. Bools are never numbers."""
    if isinstance(value, bool) != (kind is bool):
        return None
    if kind is float:
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return cast(T, float(cast(float, value))) if finite else None
    if kind is int and isinstance(value, float):
        return cast(T, int(value)) if value.is_integer() else None
    return value if isinstance(value, kind) else None


def _at_least(low: float) -> _Rule:
    return lambda value: None if value >= low else f"must be >= {low}"


def _above(low: float) -> _Rule:
    return lambda value: None if value > low else f"must be > {low}"


def _between(low: float, high: float) -> _Rule:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


def _one_of(*choices: str) -> _Rule:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _known(names: Collection[str], what: str) -> _Rule:
    return lambda value: None if value in names else f"unknown {what} {value!r}"


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _sha256_hex(value: str) -> str | None:
    return None if re.fullmatch(r"[0-9a-fA-F]{64}", value) else "must be 64 hex characters"


def _redis_url(value: str) -> str | None:
    schemes = ("redis://", "rediss://", "unix://")
    return None if not value or value.startswith(schemes) else "must start with redis://, rediss:// or unix://"


def _http_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = urlsplit("")
    return None if parts.scheme in ("http", "https") and parts.netloc else "must be an http:// or https:// URL"


def _read_config(r: _Reader) -> Config:
    server = r.section("server", _read_server)
    redis = r.section("redis", _read_redis)
    model_names = r.names("models")
    keys = r.each("keys", partial(_read_key, models=model_names), least="key")
    r.flag_repeats("keys", [key.name for key in keys], "name", "name")
    r.flag_repeats("keys", [key.key_sha256 for key in keys], "", "key")
    providers = r.named("providers", _read_provider, least="provider")
    models = r.named(
        "models", partial(_read_model, providers=providers.keys(), models=model_names), least="model"
    )
    return Config(
        server=server,
        redis=redis,
        keys=tuple(keys),
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        routing=r.section("routing", _read_routing),
        logging=r.section("logging", _read_logging),
    )


def _read_server(r: _Reader) -> ServerConfig:
    d = ServerConfig()
    return ServerConfig(
        host=r.get("host", str, d.host, _non_empty),
        port=r.get("port", int, d.port, _between(0, 65535)),
        workers=r.get("workers", int, d.workers, _at_least(1)),
        max_body_bytes=r.get("max_body_bytes", int, d.max_body_bytes, _at_least(1)),
        drain_delay_s=r.get("drain_delay_s", float, d.drain_delay_s, _at_least(0)),
        shutdown_grace_s=r.get("shutdown_grace_s", float, d.shutdown_grace_s, _at_least(0)),
        admin_key=r.get("admin_key", str, d.admin_key),
    )


def _read_redis(r: _Reader) -> RedisConfig:
    d = RedisConfig()
    return RedisConfig(
        url=r.get("url", str, d.url, _redis_url),
        timeout_ms=r.get("timeout_ms", int, d.timeout_ms, _at_least(1)),
        on_error=r.get("on_error", str, d.on_error, _one_of("fail_open", "fail_closed")),
    )


def _read_limits(r: _Reader) -> Limits:
    return Limits(
        rpm=r.get("rpm", int, None, _at_least(1)),
        tpm=r.get("tpm", int, None, _at_least(1)),
        concurrency=r.get("concurrency", int, None, _at_least(1)),
    )


def _read_key(r: _Reader, models: Collection[str]) -> KeyConfig:
    d = KeyConfig(name="", key_sha256="")
    return KeyConfig(
        name=r.get("name", str, "", _non_empty, required=True),
        key_sha256=_read_key_hash(r),
        group=r.get("group", str, d.group, _non_empty),
        models=_frozen(r.strings("models", _known(models, "model"))),
        limits=r.section("limits", _read_limits),
        budget_tokens=r.get("budget_tokens", int, d.budget_tokens, _at_least(1)),
    )


def _read_key_hash(r: _Reader) -> str:
    """The key's SHA-256 hex, from `key_sha256` or computed from a plaintext `key`."""
    if r.has("key") == r.has("key_sha256"):
        r.report("", "exactly one of key and key_sha256 is required")
    key = r.get("key", str, "", _non_empty)
    digest = r.get("key_sha256", str, "", _sha256_hex)
    return digest.lower() or (hashlib.sha256(key.encode()).hexdigest() if key else "")


def _read_provider(name: str, r: _Reader) -> ProviderConfig:
    d = ProviderConfig(name=name, type="")
    kind = r.get("type", str, "", _one_of("openai", "mock"), required=True)
    is_openai = kind == "openai"
    for key in ("latency_ms", "chunk_delay_ms"):
        if is_openai and r.has(key):
            r.report(key, "only allowed for type mock")
    base_url = r.get("base_url", str, "", _http_url, required=is_openai)
    read_account = partial(_read_account, needs_key=is_openai)
    accounts = r.each("accounts", read_account, least="account" if is_openai else "")
    r.flag_repeats("accounts", [account.name for account in accounts], "name", "name")
    if kind == "mock" and not accounts:
        accounts = [AccountConfig(name="mock")]
    return ProviderConfig(
        name=name,
        type=kind,
        base_url=base_url.rstrip("/"),
        timeouts=r.section("timeouts", _read_timeouts),
        breaker=r.section("breaker", _read_breaker),
        accounts=tuple(accounts),
        latency_ms=r.get("latency_ms", float, d.latency_ms, _at_least(0)),
        chunk_delay_ms=r.get("chunk_delay_ms", float, d.chunk_delay_ms, _at_least(0)),
    )


def _read_account(r: _Reader, needs_key: bool) -> AccountConfig:
    d = AccountConfig(name="")
    return AccountConfig(
        name=r.get("name", str, "", _non_empty, required=True),
        api_key=r.get("api_key", str, d.api_key, _non_empty if needs_key else None, needs_key),
        weight=r.get("weight", float, d.weight, _above(0)),
        priority=r.get("priority", int, d.priority, _at_least(0)),
        max_concurrency=r.get("max_concurrency", int, d.max_concurrency, _at_least(1)),
        limits=r.section("limits", _read_limits),
        groups=_frozen(r.strings("groups")),
    )


def _read_timeouts(r: _Reader) -> Timeouts:
    d = Timeouts()
    return Timeouts(
        connect_s=r.get("connect_s", float, d.connect_s, _above(0)),
        first_byte_s=r.get("first_byte_s", float, d.first_byte_s, _above(0)),
        idle_s=r.get("idle_s", float, d.idle_s, _above(0)),
        total_s=r.get("total_s", float, d.total_s, _above(0)),
    )


def _read_breaker(r: _Reader) -> BreakerConfig:
    d = BreakerConfig()
    breaker = BreakerConfig(
        consecutive_failures=r.get("consecutive_failures", int, d.consecutive_failures, _at_least(1)),
        failure_rate=r.get("failure_rate", float, d.failure_rate, _fraction),
        min_requests=r.get("min_requests", int, d.min_requests, _at_least(1)),
        window_s=r.get("window_s", float, d.window_s, _above(0)),
        open_s=r.get("open_s", float, d.open_s, _above(0)),
        max_open_s=r.get("max_open_s", float, d.max_open_s, _above(0)),
        half_open_probes=r.get("half_open_probes", int, d.half_open_probes, _at_least(1)),
    )
    if breaker.max_open_s < breaker.open_s:
        r.report("max_open_s", f"must be >= open_s ({breaker.open_s:g})")
    return breaker


def _fraction(value: float) -> str | None:
    return None if 0 < value <= 1 else "must be > 0 and <= 1"


def _read_model(
    name: str, r: _Reader, providers: Collection[str], models: Collection[str]
) -> ModelConfig:
    d = ModelConfig(name=name)
    kinds = ("chat", "completion", "embedding", "image", "audio", "moderation", "rerank")
    known_model = _known(models, "model")
    return ModelConfig(
        name=name,
        kind=r.get("kind", str, d.kind, _one_of(*kinds)),
        targets=tuple(r.each("targets", partial(_read_target, model=name, providers=providers), "target")),
        fallbacks=r.strings(
            "fallbacks", lambda value: "must not name the model itself" if value == name else known_model(value)
        ) or (),
        limits=r.section("limits", _read_limits),
        default_max_tokens=r.get("default_max_tokens", int, d.default_max_tokens, _at_least(1)),
    )


def _read_target(r: _Reader, model: str, providers: Collection[str]) -> Target:
    return Target(
        provider=r.get("provider", str, "", _known(providers, "provider"), required=True),
        model=r.get("model", str, model, _non_empty),
    )


def _read_routing(r: _Reader) -> RoutingConfig:
    d = RoutingConfig()
    strategies = ("least_busy", "weighted_random", "round_robin")
    return RoutingConfig(
        strategy=r.get("strategy", str, d.strategy, _one_of(*strategies)),
        max_attempts=r.get("max_attempts", int, d.max_attempts, _at_least(1)),
        retry_budget=r.get("retry_budget", float, d.retry_budget, _at_least(0)),
        retry_min_per_s=r.get("retry_min_per_s", float, d.retry_min_per_s, _at_least(0)),
        sticky=r.section("sticky", _read_sticky),
    )


def _read_sticky(r: _Reader) -> StickyConfig:
    d = StickyConfig()
    return StickyConfig(
        enabled=r.get("enabled", bool, d.enabled),
        ttl_s=r.get("ttl_s", float, d.ttl_s, _above(0)),
    )


def _read_logging(r: _Reader) -> LoggingConfig:
    d = LoggingConfig()
    return LoggingConfig(
        level=r.get("level", str, d.level, _one_of("debug", "info", "warning", "error")),
        access_log=r.get("access_log", bool, d.access_log),
    )


def _frozen(values: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)
