"""`BucketTables`: every configured rate-limit bucket by owner (key, model, account), built once
per config with limits ÷ the number of workers sharing them.

Sits below the request path: `gateway` builds it, `admission` reads it. Imports only `config`
and `ratelimit`; holds no state that changes.
"""

from __future__ import annotations

from .config import Config
from .ratelimit import Bucket, buckets_for

NO_BUCKETS: tuple[Bucket, ...] = ()


class BucketTables:
    """Every configured bucket by owner, built once per config (limits ÷ `divisor` workers)."""

    def __init__(self, config: Config, divisor: int) -> None:
        self.keys = {k.name: buckets_for("key", k.name, k.limits, divisor) for k in config.keys}
        self.models = {
            m.name: buckets_for("model", m.name, m.limits, divisor) for m in config.models.values()
        }
        self.accounts = {
            f"{p.name}/{a.name}": buckets_for("account", f"{p.name}/{a.name}", a.limits, divisor)
            for p in config.providers.values()
            for a in p.accounts
        }
