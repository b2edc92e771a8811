"""Reading the config file into `Config`: the entry points and what each section may hold.

Reports every problem at once, each with its path. The schema-agnostic machinery (substitution,
YAML, `Reader`) is `configreader`'s. Imports nothing of the app but `config` and `configreader`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import replace
from decimal import Decimal
from functools import partial
from types import MappingProxyType
from urllib.parse import urlsplit

import re2

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
    Price,
    StickyConfig,
    RoutingConfig,
    LoggingConfig,
    GuardrailConfig,
    Config,
    ConfigError,
)
from .caps import THINKING_MODES, Caps
from .periods import KINDS
from .configreader import (
    Reader,
    Rule,
    Spec,
    known,
    load_yaml,
    make_rule,
    one_of,
    read_mapping,
    substitute,
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
    substituted, problems = substitute(text, env)
    data, yaml_problems = load_yaml(substituted)
    problems += yaml_problems
    if not isinstance(data, dict):
        raise ConfigError(problems)
    config = read_mapping(data, "", problems, _read_config)
    if problems:
        raise ConfigError(problems)
    return config


def substitute_env(text: str, env: Mapping[str, str]) -> str:
    """Replaces `${VAR}` and `${VAR:-default}` outside comment lines; ConfigError if VAR unset."""
    result, problems = substitute(text, env)
    if problems:
        raise ConfigError(problems)
    return result


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _header_text(value: str) -> str | None:
    """Text sent in a header line, where a line break would end it (and start another)."""
    if not value:
        return "must not be empty"
    if not value.isprintable():
        return "must not contain line breaks or control characters"
    return None


_NON_EMPTY = make_rule(bool, "must not be empty")
_NOT_NEGATIVE = make_rule(lambda value: value >= 0, "must be >= 0")
_POSITIVE = make_rule(lambda value: value > 0, "must be > 0")
_PORT = make_rule(lambda value: 0 <= value <= 65535, "must be between 0 and 65535")
_FRACTION = make_rule(lambda value: 0 < value <= 1, "must be > 0 and <= 1")
_SHA256 = make_rule(
    lambda value: re.fullmatch("[0-9a-fA-F]{64}", value), "must be 64 hex characters"
)
_HTTP_URL = make_rule(_is_http_url, "must be an http:// or https:// URL")
_REDIS_URL = make_rule(
    lambda value: not value or value.startswith(("redis://", "rediss://", "unix://")),
    "must be empty or start with redis://, rediss:// or unix://",
)

_SERVER: Spec = {
    "host": (str, _NON_EMPTY),
    "port": (int, _PORT),
    "admin_key": (str, None),
    "workers": (int, _POSITIVE),
    "max_body_bytes": (int, _POSITIVE),
    "drain_delay_s": (float, _NOT_NEGATIVE),
    "shutdown_grace_s": (float, _NOT_NEGATIVE),
    "header_timeout_s": (float, _POSITIVE),
    "keepalive_s": (float, _POSITIVE),
    "body_timeout_s": (float, _POSITIVE),
}
_REDIS: Spec = {
    "url": (str, _REDIS_URL),
    "timeout_ms": (int, _POSITIVE),
    "on_error": (str, one_of("fail_open", "fail_closed")),
}
_KEY: Spec = {
    "name": (str, _NON_EMPTY),
    "group": (str, _NON_EMPTY),
    "budget_tokens": (int, _POSITIVE),
    "budget_period": (str, one_of(*KINDS)),
}
_LIMITS: Spec = dict.fromkeys(("rpm", "tpm", "concurrency"), (int, _POSITIVE))
_MOCK: Spec = {
    **dict.fromkeys(("latency_ms", "chunk_delay_ms"), (float, _NOT_NEGATIVE)),
    "imitate": (str, one_of("openai", "anthropic")),
}
_ANTHROPIC: Spec = {"anthropic_version": (str, _header_text)}
_AZURE: Spec = {"api_version": (str, _header_text), "supports_stream_usage": (bool, None)}
# Options that only one type reads, by type: a key of another type's is a mistake worth naming.
_TYPE_OPTIONS: dict[str, Spec] = {"mock": _MOCK, "anthropic": {**_ANTHROPIC, "anthropic_beta": (str, None)}, "azure": _AZURE}
_PROVIDER_TYPES = ("openai", "anthropic", "azure", "gemini", "mock")
_CAPS: Spec = {
    "max_output_tokens": (int, _POSITIVE),
    "thinking": (str, one_of(*THINKING_MODES)),
    **dict.fromkeys(
        ("sampling_params", "prefill", "forced_tool_choice", "structured_outputs", "expose_reasoning"),
        (bool, None),
    ),
}
_TIMEOUTS: Spec = dict.fromkeys(
    ("connect_s", "first_byte_s", "idle_s", "total_s"), (float, _POSITIVE)
)
_BREAKER: Spec = {
    "consecutive_failures": (int, _POSITIVE),
    "failure_rate": (float, _FRACTION),
    "min_requests": (int, _POSITIVE),
    "window_s": (float, _POSITIVE),
    "open_s": (float, _POSITIVE),
    "max_open_s": (float, _POSITIVE),
    "half_open_probes": (int, _POSITIVE),
}
_ACCOUNT: Spec = {
    "name": (str, _NON_EMPTY),
    "api_key": (str, _header_text),
    "weight": (float, _POSITIVE),
    "priority": (int, _NOT_NEGATIVE),
    "max_concurrency": (int, _POSITIVE),
}
_MOCK_ACCOUNT: Spec = {**_ACCOUNT, "api_key": (str, None)}
_MODEL: Spec = {
    "kind": (
        str,
        one_of("chat", "completion", "embedding", "image", "audio", "moderation", "rerank"),
    ),
    "default_max_tokens": (int, _POSITIVE),
}
_GUARDRAIL: Spec = {
    "type": (str, one_of("pii", "regex")),
    "action": (str, one_of("block", "redact", "log")),
}
# The built-in detectors (proxy.guardrails.detectors.CATEGORIES, which config does not import).
GUARDRAIL_CATEGORIES = ("email", "phone", "credit_card", "iban", "ssn", "ip_address", "secret")
_CATEGORY_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_ROUTING: Spec = {
    "strategy": (str, one_of("least_busy", "weighted_random", "round_robin")),
    "max_attempts": (int, _POSITIVE),
    "retry_budget": (float, _NOT_NEGATIVE),
    "retry_min_per_s": (float, _NOT_NEGATIVE),
}
_STICKY: Spec = {"enabled": (bool, None), "ttl_s": (float, _POSITIVE)}
_LOGGING: Spec = {
    "level": (str, one_of("debug", "info", "warning", "error")),
    "access_log": (bool, None),
    "metrics": (bool, None),
}


def _read_config(r: Reader) -> Config:
    server = r.scalars("server", ServerConfig(), _SERVER)
    redis = r.scalars("redis", RedisConfig(), _REDIS)
    models_value = r.data.get("models")
    model_names = frozenset(models_value) if isinstance(models_value, dict) else frozenset()
    guardrails = r.named("guardrails", _read_guardrail)
    guardrail_rule = known(guardrails.keys(), "guardrail")
    keys = r.each("keys", partial(_read_key, models=model_names, guardrails=guardrail_rule), least="key")
    r.flag_repeats("keys", [key.name for key in keys], "name", "name")
    r.flag_repeats("keys", [key.key_sha256 for key in keys], "", "key")
    providers = r.named("providers", _read_provider, least="provider")
    read_model = partial(
        _read_model, providers=providers.keys(), models=model_names, guardrails=guardrail_rule
    )
    models = r.named("models", read_model, least="model")
    _check_priced(r, keys, models)
    return Config(
        server=server,
        redis=redis,
        keys=tuple(keys),
        providers=MappingProxyType(providers),
        models=MappingProxyType(models),
        routing=r.section("routing", _read_routing),
        logging=r.scalars("logging", LoggingConfig(), _LOGGING),
        guardrails=MappingProxyType(guardrails),
    )


def _read_key(r: Reader, models: Collection[str], guardrails: Rule) -> KeyConfig:
    key = r.fill(KeyConfig(name="", key_sha256=""), _KEY, required=("name",))
    budget_usd = r.get("budget_usd", float, None, _POSITIVE)
    return replace(
        key,
        budget_nano_usd=None if budget_usd is None else _scaled(budget_usd, 9),
        key_sha256=_read_key_hash(r),
        models=_frozen(r.strings("models", known(models, "model"))),
        limits=r.scalars("limits", Limits(), _LIMITS),
        guardrails=r.strings("guardrails", guardrails) or (),
    )


def _read_key_hash(r: Reader) -> str:
    """The key's SHA-256 hex, from `key_sha256` or computed from a plaintext `key`."""
    if ("key" in r.data) == ("key_sha256" in r.data):
        r.report("", "exactly one of key and key_sha256 is required")
    key = r.get("key", str, "", _NON_EMPTY)
    digest = r.get("key_sha256", str, "", _SHA256)
    return digest.lower() or (hashlib.sha256(key.encode()).hexdigest() if key else "")


def _read_provider(name: str, r: Reader) -> ProviderConfig:
    kind = r.get("type", str, "", one_of(*_PROVIDER_TYPES), required=True)
    is_remote = kind != "mock"
    for owner, options in _TYPE_OPTIONS.items():
        for key in options:
            if kind and kind != owner and key in r.data:
                r.report(key, f"only allowed for type {owner}")
    base_url = r.get("base_url", str, "", _HTTP_URL, required=is_remote)
    read_account = partial(_read_account, needs_key=is_remote)
    accounts = r.each("accounts", read_account, least="account" if is_remote else "")
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
        anthropic_beta=r.strings("anthropic_beta", _header_text) or (),
    )
    if kind == "azure" and "api_version" not in r.data:
        r.report("api_version", 'is required for type azure ("v1" or a dated version)')
    return r.fill(provider, {**_MOCK, **_ANTHROPIC, **_AZURE})


def _read_account(r: Reader, needs_key: bool) -> AccountConfig:
    # Only a real upstream needs a key; a mock account may leave it out or empty.
    spec, required = (_ACCOUNT, ("name", "api_key")) if needs_key else (_MOCK_ACCOUNT, ("name",))
    account = r.fill(AccountConfig(name=""), spec, required)
    return replace(
        account,
        limits=r.scalars("limits", Limits(), _LIMITS),
        groups=_frozen(r.strings("groups")),
    )


def _read_breaker(r: Reader) -> BreakerConfig:
    breaker = r.fill(BreakerConfig(), _BREAKER)
    if breaker.max_open_s < breaker.open_s:
        r.report("max_open_s", f"must be >= open_s ({breaker.open_s:g})")
    return breaker


def _read_model(
    name: str, r: Reader, providers: Collection[str], models: Collection[str], guardrails: Rule
) -> ModelConfig:
    model = r.fill(ModelConfig(name=name), _MODEL)
    read_target = partial(_read_target, model=name, providers=providers)
    return replace(
        model,
        targets=tuple(r.each("targets", read_target, least="target")),
        fallbacks=r.strings("fallbacks", _other_model(name, models)) or (),
        limits=r.scalars("limits", Limits(), _LIMITS),
        caps=r.scalars("caps", Caps(), _CAPS),
        guardrails=r.strings("guardrails", guardrails) or (),
        price=r.section("price", _read_price) if r.data.get("price") is not None else None,
    )


def _read_price(r: Reader) -> Price:
    """USD per million tokens, held as pico-dollars per token (exact to six decimals)."""
    found: dict[str, int] = {}
    for name in ("input", "output", "cached_input", "cache_write"):
        value = r.get(name, float, None, _NOT_NEGATIVE, required=name in ("input", "output"))
        if value is None:
            continue
        if _scaled(value, 6) != Decimal(repr(value)) * 10**6:
            r.report(name, "must have at most 6 decimal places (USD per million tokens)")
        found[name] = _scaled(value, 6)
    given = found.get("input", 0)
    return Price(
        input=given,
        output=found.get("output", 0),
        cached_input=found.get("cached_input", given),
        cache_write=found.get("cache_write", given),
    )


def _scaled(value: float, decimals: int) -> int:
    """`value` × 10^decimals as an integer, from its decimal text (never the float's binary noise)."""
    return int((Decimal(repr(value)) * 10**decimals).to_integral_value())


def _check_priced(r: Reader, keys: list[KeyConfig], models: Mapping[str, ModelConfig]) -> None:
    """A key with a money budget may reach only priced models, its models' fallbacks included:
    an unpriced one would record its spend as nothing."""
    for index, key in enumerate(keys):
        if key.budget_nano_usd is None:
            continue
        reachable: list[str] = []
        for name in sorted(key.models) if key.models is not None else list(models):
            if name in models:
                reachable += [name, *models[name].fallbacks]
        for name in dict.fromkeys(reachable):
            if name in models and models[name].price is None:
                r.report(
                    f"keys[{index}].budget_usd",
                    f"model {name!r} has no price (models.{name}.price); a money budget needs every model the key can reach priced",
                )


def _other_model(name: str, models: Collection[str]) -> Rule:
    known_model = known(models, "model")
    return lambda value: "must not name the model itself" if value == name else known_model(value)


def _read_target(r: Reader, model: str, providers: Collection[str]) -> Target:
    return Target(
        provider=r.get("provider", str, "", known(providers, "provider"), required=True),
        model=r.get("model", str, model, _NON_EMPTY),
    )


def _read_guardrail(name: str, r: Reader) -> GuardrailConfig:
    guardrail = r.fill(GuardrailConfig(name=name), _GUARDRAIL, required=("type", "action"))
    apply_to = r.strings("apply_to", one_of("request", "response"))
    if apply_to is not None and not apply_to:
        r.report("apply_to", "at least one of request, response is required")
    if "response" in (apply_to or ()) and guardrail.action == "block":
        r.report("action", "block cannot apply to responses (already on their way): use redact or log")
    categories = r.strings("categories", one_of(*GUARDRAIL_CATEGORIES))
    patterns = r.section("patterns", _read_patterns) if "patterns" in r.data else {}
    if guardrail.type == "regex":
        if categories is not None:
            r.report("categories", "only for type pii (a regex guardrail's categories are its patterns' names)")
        if not r.data.get("patterns"):
            r.report("patterns", "at least one pattern is required for type regex")
    elif patterns:
        r.report("patterns", "only for type regex")
    return replace(
        guardrail,
        categories=categories or (),
        patterns=MappingProxyType(patterns),
        apply_to=frozenset(apply_to) if apply_to else guardrail.apply_to,
    )


def _read_patterns(r: Reader) -> dict[str, str]:
    """Category name -> RE2 pattern. A pattern RE2 refuses (back references, lookaround) is a
    problem here, at load: at run time every pattern matches in linear time."""
    patterns: dict[str, str] = {}
    for category in list(r.data):
        if not isinstance(category, str) or not _CATEGORY_NAME.fullmatch(category):
            r.report(str(category), "a category name is letters, digits, _ and - only")
            r.read.add(str(category))
            continue
        pattern = r.get(category, str, "", _re2_pattern, required=True)
        if pattern:
            patterns[category] = pattern
    return patterns


def _re2_pattern(pattern: str) -> str | None:
    if not pattern:
        return "must not be empty"
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern.encode(), options)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
        return f"not a pattern RE2 can run in linear time: {reason}"
    if compiled.search(b"") is not None:
        return "must not match the empty string"
    return None


def _read_routing(r: Reader) -> RoutingConfig:
    routing = r.fill(RoutingConfig(), _ROUTING)
    return replace(routing, sticky=r.scalars("sticky", StickyConfig(), _STICKY))


def _frozen(values: tuple[str, ...] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(values)
