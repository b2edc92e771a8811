"""Reading the config file: `${VAR}` substitution, YAML, strict validation into `Config`.

Reports every problem at once, each with its path. Imports nothing of the app but `config`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from functools import partial
from types import MappingProxyType
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from .config import (
    Limits,
    ServerConfig,
    RedisConfig,
    KeyConfig,
    Timeouts,
    BreakerConfig,
    AccountConfig,
    ProviderConfig,
    Target,
    ModelConfig,
    StickyConfig,
    RoutingConfig,
    LoggingConfig,
    Config,
    ConfigError,
)


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
    """Replaces `${VAR}` and `${VAR:-default}` outside comment lines; ConfigError if VAR unset."""
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
    def resolve(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name is None:
            problems.append(f"line {number}: malformed ${{...}}; use ${{VAR}} or ${{VAR:-default}}")
        elif default is not None:
            return env.get(name) or default
        elif name in env:
            return env[name]
        else:
            problems.append(f"line {number}: environment variable {name} is not set")
        # Left as written, so an unset secret does not also surface as an empty field.
        return match[0]

    return _REFERENCE.sub(resolve, line)


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records duplicate keys, of which plain YAML silently keeps the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [key for key, _ in node.value if isinstance(key, yaml.ScalarNode)]
        # A merge (`<<: *anchor`) may legitimately be overridden, so such mappings are skipped.
        if all(key.tag != "tag:yaml.org,2002:merge" for key in keys):
            seen: set[tuple[str, object]] = set()
            for key in keys:
                if (key.tag, key.value) in seen:
                    line = key.start_mark.line + 1
                    self.duplicates.append(f"line {line}: duplicate key {key.value}")
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
_Spec = Mapping[str, tuple[type[Any], "_Rule | None"]]  # field name -> (YAML type, rule)
_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class _Reader:
    """Reads one mapping found at `path`: typed values, nested readers, and the keys nobody read."""

    def __init__(self, data: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.data: dict[Any, Any] = data if isinstance(data, dict) else {}
        self.read: set[str] = set()
        self.quiet = False
        if data is not None and not isinstance(data, dict):
            self.report("", "must be a mapping")
            self.quiet = True  # problems with its fields would only repeat this one

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else self.path or key

    def report(self, key: str, message: str) -> None:
        if not self.quiet:
            self.problems.append(f"{self.at(key)}: {message}")

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

    def fill(self, defaults: T, spec: _Spec, required: Collection[str] = ()) -> T:
        """`defaults` (a dataclass) with each field named in `spec` read from this mapping."""
        values = {
            key: self.get(key, kind, getattr(defaults, key), rule, key in required)
            for key, (kind, rule) in spec.items()
        }
        return cast(T, replace(cast(Any, defaults), **values))

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
        return self._nested(self.data.get(key), key, build)

    def scalars(self, key: str, defaults: T, spec: _Spec) -> T:
        return self.section(key, lambda reader: reader.fill(defaults, spec))

    def each(self, key: str, build: Callable[[_Reader], T], least: str = "") -> list[T]:
        items = self._container(key, list, least) or []
        return [self._nested(item, f"{key}[{i}]", build) for i, item in enumerate(items)]

    def named(self, key: str, build: Callable[[str, _Reader], T], least: str = "") -> dict[str, T]:
        built: dict[str, T] = {}
        for name, item in (self._container(key, dict, least) or {}).items():
            if isinstance(name, str) and name:
                built[name] = self._nested(item, f"{key}.{name}", partial(build, name))
            else:
                self.report(key, f"name {name!r} must be a non-empty string")
        return built

    def flag_repeats(self, key: str, values: Sequence[str], attribute: str, what: str) -> None:
        """Reports each non-empty value of list `key` that an earlier item already has."""

        def where(index: int) -> str:
            return self.at(f"{key}[{index}]" + (f".{attribute}" if attribute else ""))

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
        """The list or mapping at `key` (None if absent or wrong); `least` names a required item."""
        self.read.add(key)
        value = self.data.get(key)
        if value is not None and not isinstance(value, kind):
            self.report(key, "must be a list" if kind is list else "must be a mapping")
            return None
        if least and not value:
            self.report(key, f"at least one {least} is required")
        return value

    def _nested(self, data: object, key: str, build: Callable[[_Reader], T]) -> T:
        return _build(data, self.at(key), self.problems, build)


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


def _rule(test: Callable[[Any], object], message: str) -> _Rule:
    return lambda value: None if test(value) else message


def _one_of(*choices: str) -> _Rule:
    return _rule(lambda value: value in choices, f"must be one of {', '.join(choices)}")


def _known(names: Collection[str], what: str) -> _Rule:
    return lambda value: None if value in names else f"unknown {what} {value!r}"


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


_NON_EMPTY = _rule(bool, "must not be empty")
_NOT_NEGATIVE = _rule(lambda value: value >= 0, "must be >= 0")
_POSITIVE = _rule(lambda value: value > 0, "must be > 0")
_PORT = _rule(lambda value: 0 <= value <= 65535, "must be between 0 and 65535")
_FRACTION = _rule(lambda value: 0 < value <= 1, "must be > 0 and <= 1")
_SHA256 = _rule(lambda value: re.fullmatch("[0-9a-fA-F]{64}", value), "must be 64 hex characters")
_HTTP_URL = _rule(_is_http_url, "must be an http:// or https:// URL")
_REDIS_URL = _rule(
    lambda value: not value or value.startswith(("redis://", "rediss://", "unix://")),
    "must be empty or start with redis://, rediss:// or unix://",
)

_SERVER: _Spec = {
    "host": (str, _NON_EMPTY),
    "port": (int, _PORT),
    "admin_key": (str, None),
    "workers": (int, _POSITIVE),
    "max_body_bytes": (int, _POSITIVE),
    "drain_delay_s": (float, _NOT_NEGATIVE),
    "shutdown_grace_s": (float, _NOT_NEGATIVE),
}
_REDIS: _Spec = {
    "url": (str, _REDIS_URL),
    "timeout_ms": (int, _POSITIVE),
    "on_error": (str, _one_of("fail_open", "fail_closed")),
}
_KEY: _Spec = {
    "name": (str, _NON_EMPTY),
    "group": (str, _NON_EMPTY),
    "budget_tokens": (int, _POSITIVE),
}
_LIMITS: _Spec = dict.fromkeys(("rpm", "tpm", "concurrency"), (int, _POSITIVE))
_MOCK: _Spec = dict.fromkeys(("latency_ms", "chunk_delay_ms"), (float, _NOT_NEGATIVE))
_TIMEOUTS: _Spec = dict.fromkeys(
    ("connect_s", "first_byte_s", "idle_s", "total_s"), (float, _POSITIVE)
)
_BREAKER: _Spec = {
    "consecutive_failures": (int, _POSITIVE),
    "failure_rate": (float, _FRACTION),
    "min_requests": (int, _POSITIVE),
    "window_s": (float, _POSITIVE),
    "open_s": (float, _POSITIVE),
    "max_open_s": (float, _POSITIVE),
    "half_open_probes": (int, _POSITIVE),
}
_ACCOUNT: _Spec = {
    "name": (str, _NON_EMPTY),
    "api_key": (str, _NON_EMPTY),
    "weight": (float, _POSITIVE),
    "priority": (int, _NOT_NEGATIVE),
    "max_concurrency": (int, _POSITIVE),
}
_MOCK_ACCOUNT: _Spec = {**_ACCOUNT, "api_key": (str, None)}
_MODEL: _Spec = {
    "kind": (
        str,
        _one_of("chat", "completion", "embedding", "image", "audio", "moderation", "rerank"),
    ),
    "default_max_tokens": (int, _POSITIVE),
}
_ROUTING: _Spec = {
    "strategy": (str, _one_of("least_busy", "weighted_random", "round_robin")),
    "max_attempts": (int, _POSITIVE),
    "retry_budget": (float, _NOT_NEGATIVE),
    "retry_min_per_s": (float, _NOT_NEGATIVE),
}
_STICKY: _Spec = {"enabled": (bool, None), "ttl_s": (float, _POSITIVE)}
_LOGGING: _Spec = {
    "level": (str, _one_of("debug", "info", "warning", "error")),
    "access_log": (bool, None),
    "metrics": (bool, None),
}


def _read_config(r: _Reader) -> Config:
    server = r.scalars("server", ServerConfig(), _SERVER)
    redis = r.scalars("redis", RedisConfig(), _REDIS)
    models_value = r.data.get("models")
    model_names = frozenset(models_value) if isinstance(models_value, dict) else frozenset()
    keys = r.each("keys", partial(_read_key, models=model_names), least="key")
    r.flag_repeats("keys", [key.name for key in keys], "name", "name")
    r.flag_repeats("keys", [key.key_sha256 for key in keys], "", "key")
    providers = r.named("providers", _read_provider, least="provider")
    read_model = partial(_read_model, providers=providers.keys(), models=model_names)
    models = r.named("models", read_model, least="model")
    return Config(
        server=server,
        redis=redis,
        keys=tuple(keys),
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        routing=r.section("routing", _read_routing),
        logging=r.scalars("logging", LoggingConfig(), _LOGGING),
    )


def _read_key(r: _Reader, models: Collection[str]) -> KeyConfig:
    key = r.fill(KeyConfig(name="", key_sha256=""), _KEY, required=("name",))
    return replace(
        key,
        key_sha256=_read_key_hash(r),
        models=_frozen(r.strings("models", _known(models, "model"))),
        limits=r.scalars("limits", Limits(), _LIMITS),
    )


def _read_key_hash(r: _Reader) -> str:
    """The key's SHA-256 hex, from `key_sha256` or computed from a plaintext `key`."""
    if ("key" in r.data) == ("key_sha256" in r.data):
        r.report("", "exactly one of key and key_sha256 is required")
    key = r.get("key", str, "", _NON_EMPTY)
    digest = r.get("key_sha256", str, "", _SHA256)
    return digest.lower() or (hashlib.sha256(key.encode()).hexdigest() if key else "")


def _read_provider(name: str, r: _Reader) -> ProviderConfig:
    kind = r.get("type", str, "", _one_of("openai", "mock"), required=True)
    is_openai = kind == "openai"
    for key in _MOCK:
        if is_openai and key in r.data:
            r.report(key, "only allowed for type mock")
    base_url = r.get("base_url", str, "", _HTTP_URL, required=is_openai)
    read_account = partial(_read_account, needs_key=is_openai)
    accounts = r.each("accounts", read_account, least="account" if is_openai else "")
    r.flag_repeats("accounts", [account.name for account in accounts], "name", "name")
    if kind == "mock" and not accounts:
        accounts = [AccountConfig(name="mock")]
    provider = ProviderConfig(
        name=name,
        type=kind,
        base_url=base_url.rstrip("/"),
        timeouts=r.scalars("timeouts", Timeouts(), _TIMEOUTS),
        breaker=r.section("breaker", _read_breaker),
        accounts=tuple(accounts),
    )
    return r.fill(provider, _MOCK)


def _read_account(r: _Reader, needs_key: bool) -> AccountConfig:
    # Only a real upstream needs a key; a mock account may leave it out or empty.
    spec, required = (_ACCOUNT, ("name", "api_key")) if needs_key else (_MOCK_ACCOUNT, ("name",))
    account = r.fill(AccountConfig(name=""), spec, required)
    return replace(
        account,
        limits=r.scalars("limits", Limits(), _LIMITS),
        groups=_frozen(r.strings("groups")),
    )


def _read_breaker(r: _Reader) -> BreakerConfig:
    breaker = r.fill(BreakerConfig(), _BREAKER)
    if breaker.max_open_s < breaker.open_s:
        r.report("max_open_s", f"must be >= open_s ({breaker.open_s:g})")
    return breaker


def _read_model(
    name: str, r: _Reader, providers: Collection[str], models: Collection[str]
) -> ModelConfig:
    model = r.fill(ModelConfig(name=name), _MODEL)
    read_target = partial(_read_target, model=name, providers=providers)
    return replace(
        model,
        targets=tuple(r.each("targets", read_target, least="target")),
        fallbacks=r.strings("fallbacks", _other_model(name, models)) or (),
        limits=r.scalars("limits", Limits(), _LIMITS),
    )


def _other_model(name: str, models: Collection[str]) -> _Rule:
    known = _known(models, "model")
    return lambda value: "must not name the model itself" if value == name else known(value)


def _read_target(r: _Reader, model: str, providers: Collection[str]) -> Target:
    return Target(
        provider=r.get("provider", str, "", _known(providers, "provider"), required=True),
        model=r.get("model", str, model, _NON_EMPTY),
    )


def _read_routing(r: _Reader) -> RoutingConfig:
    routing = r.fill(RoutingConfig(), _ROUTING)
    return replace(routing, sticky=r.scalars("sticky", StickyConfig(), _STICKY))


def _frozen(values: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)
