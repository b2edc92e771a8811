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
from .usage import UsageLedger

# Every limiter key carries this hash tag, so one script's keys share a Redis Cluster slot.
HASH_TAG = "{llm-proxy}"
# How long the ids of applied settlement batches are remembered, so a retry of a batch whose
# call timed out after Redis ran it is not applied twice.
SETTLED_MEMORY_S = 600

# (member, concurrency buckets to release, (tpm bucket, reserved) pairs, used tokens)
Record = tuple[str, tuple[Bucket, ...], tuple[tuple[Bucket, int], ...], int]

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

-- {member, {lease key...}, {{rate key, limit, reserved}...}, used}
local function settle(record)
  local member, used = record[1], record[4]
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
end

-- {usage hash key, expire at (0: never), field, amount, field, amount, ...}
local function count(entry)
  local key = KEYS[entry[1]]
  for i = 3, #entry, 2 do
    redis.call('HINCRBY', key, entry[i], string.format('%d', entry[i + 1]))
  end
  if entry[2] > 0 then redis.call('EXPIREAT', key, string.format('%d', entry[2])) end
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

-- {member, {{key, is lease, limit, amount}...}, usage hash key or 0, token budget, money budget}
-- (a budget of -1: none) -> {admitted, refusing position (0: a budget), retry after, levels,
-- tokens and nano-dollars the period recorded (as text, exact; -1 when no budget was checked)}
local function admit(request)
  local levels = {}
  local worst, longest = check(request[2], levels)
  local tokens, nano = -1, -1
  if request[3] > 0 then
    local used = redis.call('HMGET', KEYS[request[3]], 't', 'c')
    tokens, nano = used[1] or '0', used[2] or '0'
    if (request[4] >= 0 and tonumber(tokens) >= request[4])
        or (request[5] >= 0 and tonumber(nano) >= request[5]) then
      return {0, 0, 0, levels, tokens, nano}
    end
  end
  if worst > 0 then return {0, worst, longest, levels, tokens, nano} end
  take(request[1], request[2], levels)
  return {1, 0, 0, levels, tokens, nano}
end

if #batch[2] > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', num(now - SETTLED_MEMORY_S))
end
for _, unit in ipairs(batch[2]) do
  if redis.call('ZADD', KEYS[1], 'NX', num(now), unit[1]) == 1 then
    for _, record in ipairs(unit[2]) do settle(record) end
    for _, entry in ipairs(unit[3]) do count(entry) end
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
# -> {live replicas, Redis time: seconds, microseconds}
HEARTBEAT_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.17g', now))
if tonumber(ARGV[2]) > 0 then
  redis.call('ZADD', KEYS[1], string.format('%.17g', now + tonumber(ARGV[2])), ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return {redis.call('ZCARD', KEYS[1]), tonumber(clock[1]), tonumber(clock[2])}
"""


# A lifetime token count of the layout before budget periods, moved into the `total` period's
# hash (field `t`, what a token budget checks) and deleted, atomically.
CARRY_OVER_LUA = """
local old = redis.call('GET', KEYS[1])
if not old then return 0 end
redis.call('HINCRBY', KEYS[2], 't', old)
redis.call('DEL', KEYS[1])
return 1
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

    def legacy_budget(self, key_name: str) -> str:
        """The lifetime token count of a key before budget periods (`carry_over_budgets`)."""
        return f"{self._tag}:budget:{key_name}"

    def usage(self, key_name: str, period: str) -> str:
        """A hash of a key's usage in one period (`proxy.usage` names its fields); it expires
        once the period is long past (`periods.Period.expire_at`), `total` never."""
        return f"{self._tag}:usage:{period}:{key_name}"


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

    def add_unit(self, unit_id: str, records: Sequence[Record], usage: UsageLedger | None = None) -> None:
        """Settlements and usage counted together, at most once per `unit_id`."""
        settles: list[object] = []
        for member, leases, reserved, used in records:
            lease_refs = [self._ref(self._names.bucket(bucket)) for bucket in leases]
            rates = [[self._ref(self._names.bucket(b)), b.limit, n] for b, n in reserved]
            settles.append([member, lease_refs, rates, used])
        counts: list[object] = []
        if usage is not None:
            for (key, period), figures in usage.periods.items():
                entry: list[object] = [self._ref(self._names.usage(key, period)), usage.expiry[key, period]]
                for field, amount in figures.fields():
                    entry += (field, amount)
                counts.append(entry)
        self._units.append([unit_id, settles, counts])

    def add_renewal(self, bucket: Bucket, member: str) -> None:
        self._renewals += (self._ref(self._names.bucket(bucket)), member)

    def add_admission(self, member: str, ask: Ask) -> None:
        specs = [
            [self._ref(self._names.bucket(b)), int(b.dimension == CONCURRENCY), b.limit,
             amount_for(b, ask.tokens)]
            for b in ask.buckets
        ]
        budget = ask.budget
        if budget is None:
            self._admissions.append([member, specs, 0, -1, -1])
        else:
            usage = self._ref(self._names.usage(budget.key, budget.period))
            tokens = -1 if budget.tokens is None else budget.tokens
            nano_usd = -1 if budget.nano_usd is None else budget.nano_usd
            self._admissions.append([member, specs, usage, tokens, nano_usd])

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
) -> tuple[Grant | Refusal, tuple[int, int] | None]:
    """One admission's answer from BATCH_LUA, and the budget counts Redis showed (if checked):
    (tokens, nano-dollars)."""
    admitted, position, retry_after, flat, tokens, nano_usd = result
    buckets = ask.buckets
    levels = {b.id: (flat[2 * i], flat[2 * i + 1]) for i, b in enumerate(buckets)}
    seen = (int(tokens), int(nano_usd)) if isinstance(tokens, str) else None
    if not admitted:
        if position:
            return Refusal(buckets[position - 1], retry_after, levels), seen
        spent = ask.budget.spent(*seen) if ask.budget is not None and seen is not None else ""
        return Refusal(None, 0.0, levels, spent or "tokens"), seen
    grant = Grant(
        id=member,
        levels=levels,
        leases=tuple(b for b in buckets if b.dimension == CONCURRENCY),
        reserved=tuple((b, amount_for(b, ask.tokens)) for b in buckets if b.dimension == TPM),
        remote=True,
    )
    return grant, seen
