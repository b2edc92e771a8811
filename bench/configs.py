"""The llm-proxy config files of the benchmarks, and the steps of the cost ladder.

Every config has one gateway key (`sk-bench`), no drain delay (so stopping is quick), and
models whose upstream name equals the client's, so request bytes are forwarded unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .load import GATEWAY_KEY

HIGH_LIMITS = {"rpm": 1_000_000_000, "tpm": 1_000_000_000_000}
# gpt-4o's list prices, and a monthly money budget no run can spend
PRICE = {"input": 2.5, "cached_input": 1.25, "output": 10}
HIGH_BUDGET = {"budget_usd": 1_000_000_000, "budget_period": "monthly"}


@dataclass(frozen=True)
class Step:
    """One rung of the cost ladder; each adds one feature to the one before."""

    name: str
    note: str  # what the config is, for the report
    accounts: int = 1
    limits: bool = False
    redis: bool = False
    metrics: bool = False
    access_log: bool = False
    cost: bool = False  # models priced, the key with a monthly budget_usd


LADDER = (
    Step("auth + validation", "1 account; logging: {access_log: false, metrics: false}"),
    Step("+ in-process limits", f"+ keys[0].limits {HIGH_LIMITS} (nothing refused)", limits=True),
    Step("+ Redis limits", "+ redis.url: a local redis-server", limits=True, redis=True),
    Step("+ 3 accounts (breakers, scheduling)", "+ 3 accounts of one provider, all on nginx",
         accounts=3, limits=True, redis=True),
    Step("+ metrics", "+ logging.metrics: true", accounts=3, limits=True, redis=True, metrics=True),
    Step("+ access log", "+ logging.access_log: true (stdout to a file)",
         accounts=3, limits=True, redis=True, metrics=True, access_log=True),
    Step("+ prices and budget_usd", f"+ models' price {PRICE}, keys[0] {HIGH_BUDGET} (nothing refused)",
         accounts=3, limits=True, redis=True, metrics=True, access_log=True, cost=True),
)
DEFAULT = Step(
    "llm-proxy (defaults)", "1 account, no limits, no Redis; metrics and access log on (the defaults)",
    metrics=True, access_log=True,
)


def provider(base_url: str, accounts: int = 1, *, kind: str = "openai") -> dict[str, Any]:
    """A provider of `kind` (`openai`: pass-through to `{base_url}/chat/completions`; `anthropic`:
    converted, to `{base_url}/v1/messages`)."""
    names = [f"acct-{i + 1}" for i in range(accounts)]
    return {
        "type": kind,
        "base_url": base_url,
        "accounts": [{"name": name, "api_key": f"sk-upstream-{name}"} for name in names],
    }


def mock_provider(chunk_delay_ms: float) -> dict[str, Any]:
    return {"type": "mock", "chunk_delay_ms": chunk_delay_ms}


def gateway_config(
    *, port: int, providers: dict[str, dict[str, Any]], step: Step = DEFAULT,
    redis_url: str = "",
) -> dict[str, Any]:
    """A config serving one model per provider, named like the provider."""
    key: dict[str, Any] = {"name": "bench", "key": GATEWAY_KEY}
    if step.limits:
        key["limits"] = dict(HIGH_LIMITS)
    if step.cost:
        key.update(HIGH_BUDGET)
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "drain_delay_s": 0, "shutdown_grace_s": 2},
        "keys": [key],
        "providers": providers,
        "models": {
            name: {"targets": [{"provider": name}], **({"price": dict(PRICE)} if step.cost else {})}
            for name in providers
        },
        "logging": {"level": "warning", "access_log": step.access_log, "metrics": step.metrics},
    }
    if step.redis:
        config["redis"] = {"url": redis_url}
    return config


def with_rpm(config: dict[str, Any], rpm: int) -> dict[str, Any]:
    """The same config with a tiny per-key rpm, to see whether limits are enforced at all."""
    key = {**config["keys"][0], "limits": {"rpm": rpm}}
    return {**config, "keys": [key]}


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
