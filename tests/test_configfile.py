"""The config file: env substitution, every validation rule with its path, the result's shape."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import (
    AccountConfig,
    Config,
    ConfigError,
    KeyConfig,
    Limits,
    ServerConfig,
    Target,
)
from proxy.configfile import load_config, parse_config, substitute_env

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DELETE = object()

BASE: dict[str, Any] = {
    "keys": [{"name": "team-a", "key": "sk-a"}],
    "providers": {
        "openai": {
            "type": "openai",
            "base_url": "https://api.example.com/v1/",
            "accounts": [
                {"name": "openai-1", "api_key": "sk-up-1"},
                {"name": "openai-2", "api_key": "sk-up-2"},
            ],
        },
        "mock": {"type": "mock"},
    },
    "models": {
        "gpt-4o": {
            "targets": [{"provider": "openai", "model": "gpt-4o-2024-08-06"}],
            "fallbacks": ["gpt-4o-mini"],
        },
        "gpt-4o-mini": {"targets": [{"provider": "mock"}]},
    },
}


def patched(changes: dict[str, object]) -> str:
    """BASE as YAML text, with each `path: value` of `changes` set (or removed, for DELETE)."""
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = [int(p[1:-1]) if p.startswith("[") else p for p in _split(path)]
        node: Any = data
        for part in parents:
            if isinstance(part, str) and part not in node:
                node[part] = {}
            node = node[part]
        if value is DELETE:
            del node[last]
        elif isinstance(last, int) and last == len(node):
            node.append(value)
        else:
            node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def _split(path: str) -> list[str]:
    return re.findall(r"\[\d+\]|[^.\[\]]+", path)


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env or {})
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def test_base_config_is_valid_and_the_defaults_hold() -> None:
    config = parse_config(patched({}), {})
    assert config.server == ServerConfig()
    assert (config.server.host, config.server.port, config.server.workers) == ("0.0.0.0", 8080, 1)
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert (config.server.header_timeout_s, config.server.keepalive_s) == (10.0, 75.0)
    assert config.server.body_timeout_s == 60.0
    assert (config.redis.url, config.redis.timeout_ms, config.redis.on_error) == (
        "",
        100,
        "fail_open",
    )
    assert (config.routing.strategy, config.routing.max_attempts) == ("least_busy", 3)
    assert (config.routing.sticky.enabled, config.routing.sticky.ttl_s) == (False, 3600.0)
    assert (config.logging.level, config.logging.access_log) == ("info", True)
    key = config.keys[0]
    assert (key.group, key.models, key.limits, key.budget_tokens) == (
        "default",
        None,
        Limits(),
        None,
    )
    openai = config.providers["openai"]
    assert openai.base_url == "https://api.example.com/v1"  # trailing slash dropped
    assert openai.accounts[0] == AccountConfig(name="openai-1", api_key="sk-up-1")
    assert openai.accounts[0].max_concurrency is None and openai.accounts[0].groups is None
    model = config.models["gpt-4o"]
    assert (model.kind, model.default_max_tokens, model.fallbacks) == (
        "chat",
        1024,
        ("gpt-4o-mini",),
    )
    assert model.targets == (Target(provider="openai", model="gpt-4o-2024-08-06"),)


def test_values_are_converted_and_kept_in_file_order() -> None:
    config = parse_config(
        patched(
            {
                "server.port": 80.0,
                "providers.openai.accounts[0].weight": 2,
                "providers.openai.accounts[0].groups": ["b", "a"],
                "keys[0].models": ["gpt-4o-mini"],
                "models.gpt-4o.fallbacks": ["gpt-4o-mini"],
                "routing.sticky": {"enabled": True, "ttl_s": 60},
            }
        ),
        {},
    )
    assert config.server.port == 80 and isinstance(config.server.port, int)
    assert config.providers["openai"].accounts[0].weight == 2.0
    assert isinstance(config.providers["openai"].accounts[0].weight, float)
    assert config.providers["openai"].accounts[0].groups == frozenset({"a", "b"})
    assert config.keys[0].models == frozenset({"gpt-4o-mini"})
    assert config.routing.sticky.enabled is True and config.routing.sticky.ttl_s == 60.0
    assert list(config.providers) == ["openai", "mock"]
    assert list(config.models) == ["gpt-4o", "gpt-4o-mini"]
    assert config.models["gpt-4o-mini"].targets == (Target(provider="mock", model="gpt-4o-mini"),)


@pytest.mark.parametrize(
    ("changes", "valid"),
    [
        ({"server.port": 0}, "port 0"),
        ({"server.port": 65535}, "port 65535"),
        ({"server.drain_delay_s": 0, "server.shutdown_grace_s": 0}, "no drain"),
        ({"redis.url": "rediss://cache:6380/0"}, "rediss"),
        ({"redis.url": "unix:///run/redis.sock"}, "unix socket"),
        ({"providers.openai.breaker": {"failure_rate": 1, "open_s": 5, "max_open_s": 5}}, "edges"),
        ({"providers.openai.accounts[0].priority": 0}, "priority 0"),
        ({"routing": {"retry_budget": 0, "retry_min_per_s": 0}}, "no retries"),
        ({"providers.mock.accounts": [{"name": "m1"}]}, "mock account without key"),
        ({"server.admin_key": None}, "empty admin key"),
        ({"server.header_timeout_s": 0.5, "server.keepalive_s": 600}, "connection timeouts"),
        ({"server.body_timeout_s": 0.25}, "body timeout"),
    ],
)
def test_edge_values_are_accepted(changes: dict[str, object], valid: str) -> None:
    parse_config(patched(changes), {})


def test_key_sha256_is_computed_from_key_or_taken_lower_case() -> None:
    digest = hashlib.sha256("sk-ü".encode()).hexdigest()
    config = parse_config(
        patched({"keys[0].key": "sk-ü", "keys[1]": {"name": "b", "key_sha256": "AB" * 32}}), {}
    )
    assert config.keys[0].key_sha256 == digest
    assert config.keys[1].key_sha256 == "ab" * 32


def test_mock_provider_gets_an_implicit_account() -> None:
    config = parse_config(patched({"providers.mock.latency_ms": 5}), {})
    mock = config.providers["mock"]
    assert (mock.type, mock.base_url, mock.latency_ms) == ("mock", "", 5.0)
    assert mock.accounts == (AccountConfig(name="mock"),)


def test_config_is_immutable() -> None:
    config = parse_config(patched({"keys[0].models": ["gpt-4o"]}), {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.keys[0].name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.providers["x"] = config.providers["openai"]  # type: ignore[index]
    with pytest.raises(TypeError):
        config.models["x"] = config.models["gpt-4o"]  # type: ignore[index]
    assert isinstance(config.keys, tuple)
    assert isinstance(config.keys[0].models, frozenset)
    assert isinstance(config.providers["openai"].accounts, tuple)
    assert isinstance(config.models["gpt-4o"].targets, tuple)


@pytest.mark.parametrize(
    ("env", "text", "expected"),
    [
        ({"A": "x"}, "v: ${A}", "v: x"),
        ({"A": ""}, "v: '${A}'", "v: ''"),
        ({}, "v: ${A:-dflt}", "v: dflt"),
        ({"A": ""}, "v: ${A:-dflt}", "v: dflt"),
        ({"A": "x"}, "v: ${A:-dflt}", "v: x"),
        ({}, "v: ${A:-}", "v: "),
        ({"A": "1", "B": "2"}, "v: ${A}-${B}\nw: ${B}", "v: 1-2\nw: 2"),
        ({}, "# uses ${A}\n  # ${B} too\nv: 1", "# uses ${A}\n  # ${B} too\nv: 1"),
        ({"A": "x"}, "v: ${A} # ${A}", "v: x # x"),
        ({}, "v: $A and $", "v: $A and $"),
    ],
)
def test_substitute_env(env: dict[str, str], text: str, expected: str) -> None:
    assert substitute_env(text, env) == expected


def test_substitute_env_reports_every_unset_variable_with_its_line() -> None:
    text = "a: 1\nb: ${TEAM_A_KEY}\n# ${COMMENTED}\nc: ${X:-ok} ${MISSING}\nd: ${BAD"
    with pytest.raises(ConfigError) as caught:
        substitute_env(text, {})
    assert caught.value.problems == [
        "line 2: environment variable TEAM_A_KEY is not set",
        "line 4: environment variable MISSING is not set",
        "line 5: malformed ${...}; use ${VAR} or ${VAR:-default}",
    ]


def test_parse_config_substitutes_from_env() -> None:
    text = patched({"keys[0].key": "${TEAM_A_KEY}", "server.port": "${PORT:-9000}"})
    config = parse_config(text, {"TEAM_A_KEY": "sk-env"})
    assert config.keys[0].key_sha256 == hashlib.sha256(b"sk-env").hexdigest()
    assert config.server.port == 9000


def test_unset_variable_is_reported_once_not_as_an_empty_field() -> None:
    text = patched({}).replace("key: sk-a", "key: ${TEAM_A_KEY}")
    line = text.splitlines().index("  key: ${TEAM_A_KEY}") + 1
    assert problems(text) == [f"line {line}: environment variable TEAM_A_KEY is not set"]


REJECTED = [
    # unknown keys, everywhere
    ({"serverr": {}}, "serverr: unknown key"),
    ({"server.prot": 1}, "server.prot: unknown key"),
    ({"keys[0].limits.rps": 5}, "keys[0].limits.rps: unknown key"),
    ({"providers.openai.timeouts.conect_s": 1}, "providers.openai.timeouts.conect_s: unknown key"),
    (
        {"providers.openai.accounts[0].apikey": "x"},
        "providers.openai.accounts[0].apikey: unknown key",
    ),
    ({"models.gpt-4o.targets[0].weight": 1}, "models.gpt-4o.targets[0].weight: unknown key"),
    ({"routing.sticky.ttl": 1}, "routing.sticky.ttl: unknown key"),
    ({"logging.format": "json"}, "logging.format: unknown key"),
    # types
    ({"server": "x"}, "server: must be a mapping"),
    ({"server.port": True}, "server.port: must be an integer"),
    ({"server.port": 80.5}, "server.port: must be an integer"),
    ({"server.port": "80"}, "server.port: must be an integer"),
    ({"server.host": 1}, "server.host: must be a string"),
    ({"server.admin_key": 5}, "server.admin_key: must be a string"),
    ({"server.drain_delay_s": "5s"}, "server.drain_delay_s: must be a number"),
    ({"server.drain_delay_s": False}, "server.drain_delay_s: must be a number"),
    ({"server.drain_delay_s": float("inf")}, "server.drain_delay_s: must be a number"),
    ({"routing.sticky.enabled": "yes"}, "routing.sticky.enabled: must be true or false"),
    ({"logging.access_log": 1}, "logging.access_log: must be true or false"),
    # server
    ({"server.host": ""}, "server.host: must not be empty"),
    ({"server.port": 65536}, "server.port: must be between 0 and 65535"),
    ({"server.port": -1}, "server.port: must be between 0 and 65535"),
    ({"server.workers": 0}, "server.workers: must be > 0"),
    ({"server.max_body_bytes": 0}, "server.max_body_bytes: must be > 0"),
    ({"server.drain_delay_s": -1}, "server.drain_delay_s: must be >= 0"),
    ({"server.shutdown_grace_s": -0.5}, "server.shutdown_grace_s: must be >= 0"),
    ({"server.header_timeout_s": 0}, "server.header_timeout_s: must be > 0"),
    ({"server.header_timeout_s": "10s"}, "server.header_timeout_s: must be a number"),
    ({"server.keepalive_s": -1}, "server.keepalive_s: must be > 0"),
    ({"server.keepalive_s": 0}, "server.keepalive_s: must be > 0"),
    ({"server.body_timeout_s": 0}, "server.body_timeout_s: must be > 0"),
    # redis
    ({"redis.timeout_ms": 0}, "redis.timeout_ms: must be > 0"),
    ({"redis.on_error": "ignore"}, "redis.on_error: must be one of fail_open, fail_closed"),
    (
        {"redis.url": "http://cache:6379"},
        "redis.url: must be empty or start with redis://, rediss:// or unix://",
    ),
    # keys
    ({"keys": []}, "keys: at least one key is required"),
    ({"keys": None}, "keys: at least one key is required"),
    ({"keys": "sk-a"}, "keys: must be a list"),
    ({"keys[0]": "sk-a"}, "keys[0]: must be a mapping"),
    ({"keys[0].name": DELETE}, "keys[0].name: is required"),
    ({"keys[0].name": ""}, "keys[0].name: must not be empty"),
    ({"keys[0].key": DELETE}, "keys[0]: exactly one of key and key_sha256 is required"),
    ({"keys[0].key_sha256": "ab" * 32}, "keys[0]: exactly one of key and key_sha256 is required"),
    ({"keys[0].key": ""}, "keys[0].key: must not be empty"),
    ({"keys[0].key": None}, "keys[0].key: must not be empty"),
    (
        {"keys[0].key": DELETE, "keys[0].key_sha256": "xyz"},
        "keys[0].key_sha256: must be 64 hex characters",
    ),
    (
        {"keys[0].key": DELETE, "keys[0].key_sha256": "g" * 64},
        "keys[0].key_sha256: must be 64 hex characters",
    ),
    ({"keys[1]": {"name": "team-a", "key": "sk-b"}}, "keys[1].name: same name as keys[0].name"),
    (
        {"keys[1]": {"name": "team-b", "key_sha256": hashlib.sha256(b"sk-a").hexdigest()}},
        "keys[1]: same key as keys[0]",
    ),
    ({"keys[0].group": ""}, "keys[0].group: must not be empty"),
    ({"keys[0].group": 5}, "keys[0].group: must be a string"),
    ({"keys[0].models": "gpt-4o"}, "keys[0].models: must be a list"),
    ({"keys[0].models": ["gpt-5"]}, "keys[0].models[0]: unknown model 'gpt-5'"),
    ({"keys[0].models": [1]}, "keys[0].models[0]: must be a string"),
    ({"keys[0].models": ["gpt-4o", "gpt-4o"]}, "keys[0].models[1]: duplicate entry"),
    ({"keys[0].limits": 5}, "keys[0].limits: must be a mapping"),
    ({"keys[0].limits.rpm": 0}, "keys[0].limits.rpm: must be > 0"),
    ({"keys[0].limits.tpm": 1.5}, "keys[0].limits.tpm: must be an integer"),
    ({"keys[0].limits.concurrency": -1}, "keys[0].limits.concurrency: must be > 0"),
    ({"keys[0].budget_tokens": 0}, "keys[0].budget_tokens: must be > 0"),
    # providers
    ({"providers.openai.type": DELETE}, "providers.openai.type: is required"),
    (
        {"providers.openai.type": "vertex"},
        "providers.openai.type: must be one of openai, anthropic, azure, gemini, mock",
    ),
    ({"providers.openai.imitate": "anthropic"}, "providers.openai.imitate: only allowed for type mock"),
    (
        {"providers.openai.anthropic_version": "2023-06-01"},
        "providers.openai.anthropic_version: only allowed for type anthropic",
    ),
    ({"providers.openai.api_version": "v1"}, "providers.openai.api_version: only allowed for type azure"),
    (
        {"providers.openai.type": "azure"},
        'providers.openai.api_version: is required for type azure ("v1" or a dated version)',
    ),
    ({"models.gpt-4o.caps.thinking": "always"}, "models.gpt-4o.caps.thinking: must be one of budget, adaptive, none"),
    ({"models.gpt-4o.caps.max_output_tokens": 0}, "models.gpt-4o.caps.max_output_tokens: must be > 0"),
    ({"models.gpt-4o.caps.prefill": "no"}, "models.gpt-4o.caps.prefill: must be true or false"),
    ({"models.gpt-4o.caps.temperature": 1}, "models.gpt-4o.caps.temperature: unknown key"),
    ({"providers.openai.base_url": DELETE}, "providers.openai.base_url: is required"),
    (
        {"providers.openai.base_url": "ftp://api.example.com"},
        "providers.openai.base_url: must be an http:// or https:// URL",
    ),
    (
        {"providers.openai.base_url": "https://"},
        "providers.openai.base_url: must be an http:// or https:// URL",
    ),
    (
        {"providers.openai.accounts": []},
        "providers.openai.accounts: at least one account is required",
    ),
    (
        {"providers.openai.accounts": DELETE},
        "providers.openai.accounts: at least one account is required",
    ),
    (
        {"providers.openai.accounts[0].api_key": "sk-abc\n"},  # e.g. a "\n" escape in a quoted string
        "providers.openai.accounts[0].api_key: must not contain line breaks or control characters",
    ),
    (
        {"providers.openai.latency_ms": 5},
        "providers.openai.latency_ms: only allowed for type mock",
    ),
    (
        {"providers.openai.chunk_delay_ms": 5},
        "providers.openai.chunk_delay_ms: only allowed for type mock",
    ),
    ({"providers.mock.latency_ms": -1}, "providers.mock.latency_ms: must be >= 0"),
    ({"providers.mock.chunk_delay_ms": "x"}, "providers.mock.chunk_delay_ms: must be a number"),
    (
        {"providers.openai.timeouts.connect_s": 0},
        "providers.openai.timeouts.connect_s: must be > 0",
    ),
    (
        {"providers.openai.timeouts.first_byte_s": -1},
        "providers.openai.timeouts.first_byte_s: must be > 0",
    ),
    ({"providers.openai.timeouts.idle_s": 0}, "providers.openai.timeouts.idle_s: must be > 0"),
    ({"providers.openai.timeouts.total_s": 0}, "providers.openai.timeouts.total_s: must be > 0"),
    (
        {"providers.openai.breaker.consecutive_failures": 0},
        "providers.openai.breaker.consecutive_failures: must be > 0",
    ),
    (
        {"providers.openai.breaker.failure_rate": 0},
        "providers.openai.breaker.failure_rate: must be > 0 and <= 1",
    ),
    (
        {"providers.openai.breaker.failure_rate": 1.5},
        "providers.openai.breaker.failure_rate: must be > 0 and <= 1",
    ),
    (
        {"providers.openai.breaker.min_requests": 0},
        "providers.openai.breaker.min_requests: must be > 0",
    ),
    ({"providers.openai.breaker.window_s": 0}, "providers.openai.breaker.window_s: must be > 0"),
    ({"providers.openai.breaker.open_s": 0}, "providers.openai.breaker.open_s: must be > 0"),
    (
        {"providers.openai.breaker.max_open_s": 10},
        "providers.openai.breaker.max_open_s: must be >= open_s (30)",
    ),
    (
        {"providers.openai.breaker.half_open_probes": 0},
        "providers.openai.breaker.half_open_probes: must be > 0",
    ),
    # accounts
    (
        {"providers.openai.accounts[0].name": DELETE},
        "providers.openai.accounts[0].name: is required",
    ),
    (
        {"providers.openai.accounts[1].name": "openai-1"},
        "providers.openai.accounts[1].name: same name as providers.openai.accounts[0].name",
    ),
    (
        {"providers.openai.accounts[0].api_key": DELETE},
        "providers.openai.accounts[0].api_key: is required",
    ),
    (
        {"providers.openai.accounts[0].api_key": ""},
        "providers.openai.accounts[0].api_key: must not be empty",
    ),
    (
        {"providers.openai.accounts[1].weight": 0},
        "providers.openai.accounts[1].weight: must be > 0",
    ),
    (
        {"providers.openai.accounts[1].weight": "heavy"},
        "providers.openai.accounts[1].weight: must be a number",
    ),
    (
        {"providers.openai.accounts[0].priority": -1},
        "providers.openai.accounts[0].priority: must be >= 0",
    ),
    (
        {"providers.openai.accounts[0].priority": 0.5},
        "providers.openai.accounts[0].priority: must be an integer",
    ),
    (
        {"providers.openai.accounts[0].max_concurrency": 0},
        "providers.openai.accounts[0].max_concurrency: must be > 0",
    ),
    (
        {"providers.openai.accounts[0].limits.tpm": 0},
        "providers.openai.accounts[0].limits.tpm: must be > 0",
    ),
    (
        {"providers.openai.accounts[0].groups": "default"},
        "providers.openai.accounts[0].groups: must be a list",
    ),
    (
        {"providers.openai.accounts[0].groups": ["a", None]},
        "providers.openai.accounts[0].groups[1]: must be a string",
    ),
    # models
    ({"models": {}}, "models: at least one model is required"),
    (
        {"models.gpt-4o.kind": "video"},
        "models.gpt-4o.kind: must be one of chat, completion, "
        "embedding, image, audio, moderation, rerank",
    ),
    ({"models.gpt-4o.targets": []}, "models.gpt-4o.targets: at least one target is required"),
    ({"models.gpt-4o.targets": DELETE}, "models.gpt-4o.targets: at least one target is required"),
    ({"models.gpt-4o.targets[0]": "openai"}, "models.gpt-4o.targets[0]: must be a mapping"),
    (
        {"models.gpt-4o.targets[0].provider": "opneai"},
        "models.gpt-4o.targets[0].provider: unknown provider 'opneai'",
    ),
    (
        {"models.gpt-4o.targets[0].provider": DELETE},
        "models.gpt-4o.targets[0].provider: is required",
    ),
    ({"models.gpt-4o.targets[0].model": ""}, "models.gpt-4o.targets[0].model: must not be empty"),
    ({"models.gpt-4o.fallbacks": ["gpt-5"]}, "models.gpt-4o.fallbacks[0]: unknown model 'gpt-5'"),
    (
        {"models.gpt-4o.fallbacks": ["gpt-4o"]},
        "models.gpt-4o.fallbacks[0]: must not name the model itself",
    ),
    (
        {"models.gpt-4o.fallbacks": ["gpt-4o-mini", "gpt-4o-mini"]},
        "models.gpt-4o.fallbacks[1]: duplicate entry",
    ),
    ({"models.gpt-4o.limits.rpm": 0}, "models.gpt-4o.limits.rpm: must be > 0"),
    ({"models.gpt-4o.default_max_tokens": 0}, "models.gpt-4o.default_max_tokens: must be > 0"),
    # routing and logging
    (
        {"routing.strategy": "random"},
        "routing.strategy: must be one of least_busy, weighted_random, round_robin",
    ),
    ({"routing.max_attempts": 0}, "routing.max_attempts: must be > 0"),
    ({"routing.retry_budget": -0.1}, "routing.retry_budget: must be >= 0"),
    ({"routing.retry_min_per_s": -1}, "routing.retry_min_per_s: must be >= 0"),
    ({"routing.sticky.ttl_s": 0}, "routing.sticky.ttl_s: must be > 0"),
    ({"logging.level": "trace"}, "logging.level: must be one of debug, info, warning, error"),
]


@pytest.mark.parametrize(("changes", "expected"), REJECTED, ids=[e for _, e in REJECTED])
def test_each_rule_reports_one_problem_at_its_path(
    changes: dict[str, object], expected: str
) -> None:
    assert problems(patched(changes)) == [expected]


MANY_MISTAKES = """\
server:
  prot: 8080
  workers: 0
redis:
  url: ${REDIS_URL}
keys:
  - name: team-a
    key: sk-a
    models: [gpt-5]
  - name: team-a
    key_sha256: nothex
providers:
  openai:
    type: openai
    base_url: api.openai.com
    accounts:
      - name: openai-1
        weight: -1
      - name: openai-1
        api_key: sk-2
        groups: default
  openai:
    type: openai
models:
  gpt-4o:
    kind: chat
    targets: [{provider: azure}]
    fallbacks: [gpt-4o]
routing:
  strategy: fastest
logging:
  level: verbose
  access_log: "yes"
"""


def test_a_file_with_many_mistakes_reports_all_of_them_at_once() -> None:
    assert problems(MANY_MISTAKES) == [
        "line 5: environment variable REDIS_URL is not set",
        "line 22: duplicate key openai",
        "server.workers: must be > 0",
        "server.prot: unknown key",
        "redis.url: must be empty or start with redis://, rediss:// or unix://",
        "keys[0].models[0]: unknown model 'gpt-5'",
        "keys[1].key_sha256: must be 64 hex characters",
        "keys[1].name: same name as keys[0].name",
        "providers.openai.base_url: is required",
        "providers.openai.accounts: at least one account is required",
        "models.gpt-4o.targets[0].provider: unknown provider 'azure'",
        "models.gpt-4o.fallbacks[0]: must not name the model itself",
        "routing.strategy: must be one of least_busy, weighted_random, round_robin",
        "logging.level: must be one of debug, info, warning, error",
        "logging.access_log: must be true or false",
    ]


def test_many_mistakes_inside_one_provider_are_all_reported() -> None:
    text = patched(
        {
            "providers.openai.base_url": "api.openai.com",
            "providers.openai.accounts[0]": {"name": "openai-1", "weight": -1},
            "providers.openai.accounts[1]": {"name": "openai-1", "api_key": "k", "groups": "x"},
            "providers.openai.breaker": {"open_s": 60, "max_open_s": 30, "half_open": 1},
        }
    )
    assert problems(text) == [
        "providers.openai.base_url: must be an http:// or https:// URL",
        "providers.openai.accounts[0].api_key: is required",
        "providers.openai.accounts[0].weight: must be > 0",
        "providers.openai.accounts[1].groups: must be a list",
        "providers.openai.accounts[1].name: same name as providers.openai.accounts[0].name",
        "providers.openai.breaker.max_open_s: must be >= open_s (60)",
        "providers.openai.breaker.half_open: unknown key",
    ]


@pytest.mark.parametrize(
    ("providers", "expected"),
    [({}, "at least one provider is required"), (["openai"], "must be a mapping")],
)
def test_without_providers_no_target_can_name_one(providers: object, expected: str) -> None:
    assert problems(patched({"providers": providers})) == [
        f"providers: {expected}",
        "models.gpt-4o.targets[0].provider: unknown provider 'openai'",
        "models.gpt-4o-mini.targets[0].provider: unknown provider 'mock'",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["top level: the file is empty"]),
        ("# only a comment\n", ["top level: the file is empty"]),
        ("- a\n- b\n", ["top level: must be a mapping"]),
        ("just text", ["top level: must be a mapping"]),
        (
            "{}",
            [
                "keys: at least one key is required",
                "providers: at least one provider is required",
                "models: at least one model is required",
            ],
        ),
        (
            "server:\n  port: 1\n   host: x\n",
            ["line 3: invalid YAML: mapping values are not allowed here"],
        ),
        ("a: [1, 2\n", ["line 2: invalid YAML: expected ',' or ']', but got '<stream end>'"]),
        (
            "a: !!python/object:os.system x\n",
            [
                "line 1: invalid YAML: could not determine a "
                "constructor for the tag 'tag:yaml.org,2002:python/object:os.system'"
            ],
        ),
    ],
)
def test_file_level_problems(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_anchors_and_merge_keys_still_work() -> None:
    text = """\
keys: [{name: a, key: sk-a}]
providers: {mock: {type: mock}}
models:
  small: &small
    targets: [{provider: mock}]
    default_max_tokens: 100
  large:
    <<: *small
    default_max_tokens: 4000
"""
    config = parse_config(text, {})
    assert config.models["large"].targets == (Target(provider="mock", model="large"),)
    assert config.models["large"].default_max_tokens == 4000


def test_load_config_reads_the_file_with_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(patched({"keys[0].key": "${TEST_CONFIG_KEY}"}), encoding="utf-8")
    monkeypatch.setenv("TEST_CONFIG_KEY", "sk-from-env")
    config = load_config(str(path))
    assert config.keys[0].key_sha256 == hashlib.sha256(b"sk-from-env").hexdigest()


def test_load_config_reports_an_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing))
    assert caught.value.problems == [f"{missing}: cannot read the file (No such file or directory)"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as caught:
        load_config(str(binary))
    assert caught.value.problems == [f"{binary}: cannot read the file (not UTF-8 text)"]


def test_demo_config_loads() -> None:
    config = parse_config((DEPLOY / "demo.yaml").read_text(encoding="utf-8"), {})
    assert (config.server.host, config.server.port, config.redis.url) == ("127.0.0.1", 8080, "")
    assert list(config.providers) == ["mock", "mock-claude"]
    assert (config.providers["mock-claude"].type, config.providers["mock-claude"].imitate) == ("mock", "anthropic")
    mock = config.providers["mock"]
    assert (mock.type, mock.chunk_delay_ms, mock.accounts) == (
        "mock",
        20.0,
        (AccountConfig("mock"),),
    )
    assert list(config.models) == ["demo-chat", "gpt-4o-mini", "claude-demo"]
    assert [m.targets[0].provider for m in config.models.values()] == ["mock", "mock", "mock-claude"]
    assert [key.name for key in config.keys] == ["demo"]
    assert config.keys[0].key_sha256 == hashlib.sha256(b"sk-demo").hexdigest()
    other = parse_config((DEPLOY / "demo.yaml").read_text(encoding="utf-8"), {"DEMO_KEY": "k2"})
    assert other.keys[0].key_sha256 == hashlib.sha256(b"k2").hexdigest()


def test_example_config_loads_with_and_without_environment() -> None:
    text = (DEPLOY / "example.yaml").read_text(encoding="utf-8")
    config = parse_config(text, {})
    assert isinstance(config, Config)
    openai = config.providers["openai"]
    assert [account.name for account in openai.accounts] == ["openai-1", "openai-2"]
    assert config.models["gpt-4o"].fallbacks == ("gpt-4o-mini",)
    assert all(isinstance(key, KeyConfig) for key in config.keys)
    env = {"OPENAI_KEY_1": "sk-real", "REDIS_URL": "redis://cache:6379/0", "ADMIN_KEY": "adm"}
    config = parse_config(text, env)
    assert config.providers["openai"].accounts[0].api_key == "sk-real"
    assert (config.redis.url, config.server.admin_key) == ("redis://cache:6379/0", "adm")
