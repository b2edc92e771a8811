"""The shared limiter's Redis side: key names, the Lua scripts, and one script call's payload.

Owns what lives in Redis and how a batch of settlements, lease renewals and admissions is encoded
for (and decided by) one atomic script call. The Lua bucket math mirrors `proxy.ratelimit` line by
line. Must not talk to Redis itself (RedisLimiter does) nor decide anything in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .ratelimit import (
    CONCURRENCY,
    CONCURRENCY_RETRY_S,
    TPM,
    WINDOW_S,
    Ask,
    Bucket,
    Grant,
    Refusal,
    amount_for,
)

# Every limiter key carries this hash tag, so one script's keys share a Redis Cluster slot.
HASH_TAG = "{llm-proxy}"
# How long the ids of applied settlement batches are remembered, so a retry of a batch whose
# call timed out after Redis ran it is not applied twice.
SETTLED_MEMORY_S = 600

# (member, concurrency buckets to release, (tpm bucket, reserved) pairs, budget key, used tokens)
Record = tuple[str, tuple[Bucket, ...], tuple[tuple[Bucket, int], ...], str | None, int]

_MATH = """
local function refill(level, updated, limit, now)
  local elapsed = now - updated
  if elapsed <= 0 then return level end
  return math.min(limit, level + elapsed * limit / WINDOW_S)
end

local function wait_s(level, amount, limit)
  if level >= amount then return 0 end
  return (amount - level) * WINDOW_S / limit
end

local function settle_level(level, limit, reserved, used)
  return math.min(limit, level + reserved - used)
end

local function num(x) return string.format('%.17g', x) end
"""

MATH_LUA = f"local WINDOW_S = {WINDOW_S!r}\n" + _MATH

_BATCH = """
local batch = cjson.decode(ARGV[1])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local lease_ttl, concurrency_retry = batch[1][1], batch[1][2]
local lease_expiry, lease_ttl_ms = num(now + lease_ttl), math.ceil(lease_ttl * 1000)
local rates, held = {}, {}

local function rate(key, limit)
  local state = rates[key]
  if state == nil then
    local stored = redis.call('HMGET', key, 'l', 't')
    local level = limit
    if stored[1] then level = refill(tonumber(stored[1]), tonumber(stored[2]), limit, now) end
    state = {level = level, limit = limit, dirty = false}
    rates[key] = state
  end
  return state
end

local function leases(key)
  local count = held[key]
  if count == nil then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', num(now))
    count = redis.call('ZCARD', key)
    held[key] = count
  end
  return count
end

local function hold(key, member)
  redis.call('ZADD', key, lease_expiry, member)
  redis.call('PEXPIRE', key, lease_ttl_ms)
end

-- {member, {lease key...}, {{rate key, limit, reserved}...}, budget key or 0, used}
local function settle(record)
  local member, used = record[1], record[5]
  for _, k in ipairs(record[2]) do
    if redis.call('ZREM', KEYS[k], member) == 1 and held[KEYS[k]] then
      held[KEYS[k]] = held[KEYS[k]] - 1
    end
  end
  for _, r in ipairs(record[3]) do
    local state = rate(KEYS[r[1]], r[2])
    state.level = settle_level(state.level, r[2], r[3], used)
    state.dirty = true
  end
  if record[4] > 0 and used > 0 then
    redis.call('INCRBY', KEYS[record[4]], string.format('%d', used))
  end
end

-- levels: {level, seconds until full, ...} per bucket; returns (refusing position or 0, wait)
local function check(specs, levels)
  local worst, longest = 0, 0
  for i, spec in ipairs(specs) do
    local key, limit, amount = KEYS[spec[1]], spec[3], spec[4]
    local level, wait, full
    if spec[2] == 1 then
      level, wait, full = limit - leases(key), 0, 0
      if level < amount then wait = concurrency_retry end
    else
      level = rate(key, limit).level
      wait, full = wait_s(level, amount, limit), wait_s(level, limit, limit)
    end
    levels[2 * i - 1], levels[2 * i] = level, full
    if wait > longest then worst, longest = i, wait end
  end
  return worst, longest
end

local function take(member, specs, levels)
  for i, spec in ipairs(specs) do
    local key, limit, amount = KEYS[spec[1]], spec[3], spec[4]
    if spec[2] == 1 then
      hold(key, member)
      held[key] = held[key] + 1
      levels[2 * i - 1] = levels[2 * i - 1] - 1
    else
      local state = rates[key]
      state.level, state.dirty = state.level - amount, true
      levels[2 * i - 1], levels[2 * i] = state.level, wait_s(state.level, limit, limit)
    end
  end
end

-- {member, {{key, is lease, limit, amount}...}, budget key or 0, budget limit}
-- -> {admitted, refusing position (0: the budget), retry after, levels, budget used or -1}
local function admit(request)
  local levels = {}
  local worst, longest = check(request[2], levels)
  local used = -1
  if request[3] > 0 then
    used = tonumber(redis.call('GET', KEYS[request[3]]) or '0')
    if used >= request[4] then return {0, 0, 0, levels, used} end
  end
  if worst > 0 then return {0, worst, longest, levels, used} end
  take(request[1], request[2], levels)
  return {1, 0, 0, levels, used}
end

if #batch[2] > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now - SETTLED_MEMORY_S))
end
for _, unit in ipairs(batch[2]) do
  if redis.call('ZADD', KEYS[1], 'NX', num(now), unit[1]) == 1 then
    for i = 2, #unit do settle(unit[i]) end
  end
end
local renewals = batch[3]
-- XX: a renewal only extends a lease still held; one settled meanwhile (in this very call,
-- perhaps) stays released
for i = 1, #renewals, 2 do
  if redis.call('ZADD', KEYS[renewals[i]], 'XX', 'CH', lease_expiry, renewals[i + 1]) == 1 then
    redis.call('PEXPIRE', KEYS[renewals[i]], lease_ttl_ms)
  end
end
local results = {}
for i, request in ipairs(batch[4]) do results[i] = admit(request) end
for key, state in pairs(rates) do
  if state.dirty then
    redis.call('HSET', key, 'l', num(state.level), 't', num(now))
    local full_ms = math.ceil(wait_s(state.level, state.limit, state.limit) * 1000)
    redis.call('PEXPIRE', key, full_ms + 1000)
  end
end
return cjson.encode(results)
"""

BATCH_LUA = MATH_LUA + f"local SETTLED_MEMORY_S = {SETTLED_MEMORY_S}\n" + _BATCH

# KEYS[1]: the replicas sorted set; ARGV: replica id, seconds it counts as live (0: leaving).
HEARTBEAT_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now))
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[2])), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"""


class KeyNames:
    """Redis key names under one hash tag, each computed once per bucket or key name."""

    __slots__ = ("settled", "replicas", "_tag", "_cache")

    def __init__(self, tag: str = HASH_TAG) -> None:
        self._tag = tag
        self.settled = f"{tag}:settled"
        self.replicas = f"{tag}:replicas"
        self._cache: dict[str, str] = {}

    def bucket(self, bucket: Bucket) -> str:
        """A hash {l: level, t: updated} for rpm/tpm; a sorted set of leases for concurrency."""
        name = self._cache.get(bucket.id)
        if name is None:
            kind = "lease" if bucket.dimension == CONCURRENCY else "rate"
            name = self._cache[bucket.id] = f"{self._tag}:{kind}:{bucket.id}"
        return name

    def budget(self, key_name: str) -> str:
        """The tokens recorded against a key's budget; never expires."""
        return f"{self._tag}:budget:{key_name}"


class Batch:
    """One call of BATCH_LUA: its KEYS, and a JSON payload referring to them by position."""

    __slots__ = ("keys", "_index", "_names", "_units", "_renewals", "_admissions")

    def __init__(self, names: KeyNames) -> None:
        self.keys: list[str] = [names.settled]
        self._index: dict[str, int] = {}
        self._names = names
        self._units: list[list[object]] = []
        self._renewals: list[object] = []
        self._admissions: list[list[object]] = []

    def add_unit(self, unit_id: str, records: Sequence[Record]) -> None:
        """Settlements applied together, at most once per `unit_id`."""
        unit: list[object] = [unit_id]
        for member, leases, reserved, budget_key, used in records:
            lease_refs = [self._ref(self._names.bucket(bucket)) for bucket in leases]
            rates = [[self._ref(self._names.bucket(b)), b.limit, n] for b, n in reserved]
            budget = self._ref(self._names.budget(budget_key)) if budget_key is not None else 0
            unit.append([member, lease_refs, rates, budget, used])
        self._units.append(unit)

    def add_renewal(self, bucket: Bucket, member: str) -> None:
        self._renewals += (self._ref(self._names.bucket(bucket)), member)

    def add_admission(self, member: str, ask: Ask) -> None:
        specs = [
            [self._ref(self._names.bucket(b)), int(b.dimension == CONCURRENCY), b.limit,
             amount_for(b, ask.tokens)]
            for b in ask.buckets
        ]
        budget_key, budget_limit = ask.budget_key, ask.budget_limit
        if budget_key is None or budget_limit is None:
            self._admissions.append([member, specs, 0, 0])
        else:
            budget = self._ref(self._names.budget(budget_key))
            self._admissions.append([member, specs, budget, budget_limit])

    def payload(self, lease_ttl_s: float) -> bytes:
        header = [lease_ttl_s, CONCURRENCY_RETRY_S]
        return orjson.dumps([header, self._units, self._renewals, self._admissions])

    def _ref(self, key: str) -> int:
        """KEYS position (1-based, as Lua sees it) of `key`, declared once per call."""
        position = self._index.get(key)
        if position is None:
            self.keys.append(key)
            position = self._index[key] = len(self.keys)
        return position


def decode_outcome(
    member: str, ask: Ask, result: list[Any]
) -> tuple[Grant | Refusal, int | None]:
    """One admission's answer from BATCH_LUA, and the budget count Redis showed (if checked)."""
    admitted, position, retry_after, flat, used = result
    buckets = ask.buckets
    levels = {b.id: (flat[2 * i], flat[2 * i + 1]) for i, b in enumerate(buckets)}
    seen = int(used) if used >= 0 else None
    if not admitted:
        return Refusal(buckets[position - 1] if position else None, retry_after, levels), seen
    grant = Grant(
        id=member,
        levels=levels,
        leases=tuple(b for b in buckets if b.dimension == CONCURRENCY),
        reserved=tuple((b, amount_for(b, ask.tokens)) for b in buckets if b.dimension == TPM),
        budget_key=ask.budget_key,
        remote=True,
    )
    return grant, seen
