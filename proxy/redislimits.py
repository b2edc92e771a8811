"""`RedisLimiter`: the shared store of rate limits and budgets, with its fallback (SPEC §6).

Owns the round trips: admissions and settlements coalesced into one script call at a time, lease
renewal, the replica heartbeat, and noticing when Redis is unreachable and back (what admits
meanwhile is `proxy.outage`). The decisions themselves are made by the script (`proxy.limitscript`).
Must not import aiohttp nor render errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from . import errors
from .config import RedisConfig
from .limitscript import BATCH_LUA, CARRY_OVER_LUA, HEARTBEAT_LUA, Batch, KeyNames, Record, decode_outcome
from .outage import OutageFallback
from .periods import TOTAL, PeriodClock
from .ratelimit import CONCURRENCY, Ask, Bucket, Grant, Refusal, settled_tokens
from .usage import Charge, PeriodUsage, UsageLedger

log = logging.getLogger("llm_proxy.redislimits")

T = TypeVar("T")

FAILURES_TO_DEGRADE = 3  # failed or timed-out calls in a row
PROBE_S = 0.5  # how often an unreachable Redis is re-checked
HEARTBEAT_S = 5.0
LEASE_TTL_S = 60.0
# A settlement waits this long for an admission call to ride along with before going alone.
SETTLE_LINGER_S = 0.005
# A heartbeat lets its replica count as live for this many heartbeat intervals.
LIVE_HEARTBEATS = 3
# The call outcomes that mean "Redis did not answer in time"; anything else is a bug and raises.
FAILURES = (RedisError, OSError, TimeoutError)

Outcome = Grant | Refusal | None  # None: Redis could not decide; fall back
# Settlements and usage applied at most once, under the unit's id.
Unit = tuple[str, list[Record], UsageLedger | None]


@dataclass(slots=True)
class _Waiter:
    """An admission waiting for its script call."""

    ask: Ask
    future: asyncio.Future[Outcome]
    deadline: float
    member: str


class RedisLimiter:
    """Limits shared by every replica through one Redis; see the module docstring."""

    def __init__(
        self,
        *,
        config: RedisConfig,
        client: aioredis.Redis | None = None,
        replica_id: str | None = None,
        lease_ttl_s: float = LEASE_TTL_S,
        heartbeat_s: float = HEARTBEAT_S,
        period_clock: PeriodClock | None = None,
    ) -> None:
        self._timeout_s = config.timeout_ms / 1000
        self._fallback = OutageFallback(fail_closed=config.on_error == "fail_closed")
        self._owns_client = client is None
        self._client = client if client is not None else _connect(config.url, self._timeout_s)
        self._batch_script = self._client.register_script(BATCH_LUA)
        self._heartbeat_script = self._client.register_script(HEARTBEAT_LUA)
        self._carry_script = self._client.register_script(CARRY_OVER_LUA)
        self._replica = replica_id or os.urandom(6).hex()
        self._lease_ttl_s = lease_ttl_s
        self._heartbeat_s = heartbeat_s
        self._names = KeyNames()
        self._seq = 0
        self._waiters: list[_Waiter] = []
        self._settles: list[Record] = []
        self._pending = UsageLedger()  # usage recorded here that Redis has yet to count
        self._retry_units: list[Unit] = []
        self._renewals: list[tuple[Bucket, str]] = []
        self._live: dict[str, Grant] = {}  # unsettled shared grants holding leases
        self._flush_waiters: list[asyncio.Future[None]] = []
        self._failures = 0
        self._degraded = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.script_calls = 0  # batch script calls sent: how well admissions coalesce
        # periods are read on Redis' clock, measured by every heartbeat
        self.period_clock = period_clock or PeriodClock()

    @property
    def degraded(self) -> bool:
        """True while Redis counts as unreachable."""
        return self._degraded

    @property
    def replicas(self) -> int:
        """Live replicas last seen in Redis (1 if never seen): the fallback's divisor."""
        return self._fallback.replicas

    async def start(self) -> None:
        """Registers this replica and starts the flusher, heartbeat and lease renewal."""
        self._ensure_flusher()
        await self._heartbeat()
        if "heartbeat" in self._tasks:
            return
        self._spawn("heartbeat", self._every(self._heartbeat_s, self._heartbeat))
        self._spawn("renewal", self._every(self._lease_ttl_s / 3, self._renew))
        self._spawn("carry-over", self._carry_over())

    async def carry_over_budgets(self) -> int:
        """Moves the lifetime token counts of the layout before budget periods (one string
        `{tag}:budget:<key>` per key) into the `total` period's hash, once: each move is atomic
        and deletes the old counter, so replicas starting together move each count once.
        Returns how many counters it moved (errors are logged: the counts stay where they are)."""
        moved = 0
        prefix = self._names.legacy_budget("")
        try:
            async for name in self._client.scan_iter(match=prefix + "*", count=1000):
                key = name.decode() if isinstance(name, bytes) else str(name)
                if await self._carry_script(keys=[key, self._names.usage(key[len(prefix):], TOTAL.id)]):
                    moved += 1
        except FAILURES as exc:
            log.warning("lifetime token budgets not carried over yet: %s", type(exc).__name__)
        if moved:
            log.info("carried %d lifetime token budget counters over to the total period", moved)
        return moved

    async def _carry_over(self) -> None:
        await self.carry_over_budgets()

    async def admit(self, ask: Ask) -> Grant | Refusal:
        """Decided by Redis together with whatever else is waiting; locally when it cannot."""
        if self._degraded or self._closed:
            return self._fallback.admit(ask)
        wake = self._ensure_flusher()
        loop = self._running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._seq += 1
        member = f"{self._replica}:{self._seq}"
        self._waiters.append(_Waiter(ask, future, loop.time() + self._timeout_s, member))
        if not wake.is_set():
            wake.set()
        try:
            outcome = await future
        except asyncio.CancelledError:
            # Cancelled after the script answered but before this task resumed: the grant is
            # decided and nobody holds it. (Cancelled before: `_resolve` gives it back.)
            if not future.cancelled() and isinstance(granted := future.result(), Grant):
                self.settle(granted, 0)
            raise
        return self._fallback.admit(ask) if outcome is None else outcome

    def settle(self, grant: Grant, used_tokens: int) -> None:
        """Queues the settlement for the next script call; never blocks, never drops it."""
        if grant.settled:
            return
        used = settled_tokens(used_tokens)
        self._fallback.settle(grant, used)
        if grant.remote:
            grant.settled = True
            self._live.pop(grant.id, None)
            self._settles.append((grant.id, grant.leases, grant.reserved, used))
        self._linger_flush()

    def record(self, charge: Charge) -> None:
        """Queues the usage for the next script call; kept through an outage, never dropped."""
        self._pending.add(charge)
        self._fallback.record(charge)
        self._linger_flush()

    async def usage(self, wanted: Sequence[tuple[str, str]]) -> Mapping[tuple[str, str], PeriodUsage]:
        """What Redis counted, once this replica's own pending usage is in: the same answer on
        every replica. 503 while Redis cannot answer."""
        await self.flush()
        if self._degraded or self._closed:
            raise errors.usage_unavailable()
        pipe = self._client.pipeline(transaction=False)
        for key, period in wanted:
            pipe.hgetall(self._names.usage(key, period))
        found = await self._bounded(pipe.execute())
        if found is None:
            raise errors.usage_unavailable()
        return {
            where: PeriodUsage.from_fields({k.decode(): int(v) for k, v in fields.items()})
            for where, fields in zip(wanted, found)
        }

    def _linger_flush(self) -> None:
        if self._linger is None and not self._degraded and self._loop is not None:
            wake = self._ensure_flusher()
            self._linger = self._loop.call_later(SETTLE_LINGER_S, wake.set)

    async def flush(self) -> None:
        """Returns once everything queued is in Redis, or Redis is unreachable."""
        if self._degraded or not self._has_work():
            return
        future: asyncio.Future[None] = self._running_loop().create_future()
        self._flush_waiters.append(future)
        self._ensure_flusher().set()
        await future

    async def close(self) -> None:
        """Stops the tasks, sends what is pending (bounded by timeout_ms per call), leaves."""
        if self._closed:
            return
        self._closed = True
        await _stop(list(self._tasks.values()))
        self._abandon(self._waiters)
        self._waiters = []
        if not self._degraded:
            await self._drain()
            leave = self._heartbeat_script(keys=[self._names.replicas], args=[self._replica, 0])
            await self._bounded(leave)
        if self._owns_client:
            await self._client.aclose()

    def _ensure_flusher(self) -> asyncio.Event:
        if self._wake is None:
            self._loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._spawn("flusher", self._flush_forever(self._wake))
            self._tasks["flusher"].add_done_callback(self._flusher_ended)
        return self._wake

    def _flusher_ended(self, task: asyncio.Task[None]) -> None:
        """A flusher that died of a bug must not leave admissions waiting: they fall back."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("rate limit flusher failed", exc_info=task.exception())
        self._abandon(self._waiters)
        self._waiters = []
        self._wake = None  # the next admission starts a new one
        self._release_flush_waiters()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _spawn(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        self._tasks[name] = self._running_loop().create_task(work)

    async def _every(self, period_s: float, work: Callable[[], Awaitable[None]]) -> None:
        while not self._closed:
            await asyncio.sleep(period_s)
            await work()

    async def _flush_forever(self, wake: asyncio.Event) -> None:
        while not self._closed:
            await wake.wait()
            wake.clear()
            await self._drain()

    async def _drain(self) -> None:
        """Sends batches until nothing is pending; admissions queued meanwhile join the next."""
        while not self._degraded and self._has_work():
            await self._send()
        self._release_flush_waiters()

    def _release_flush_waiters(self) -> None:
        flushed, self._flush_waiters = self._flush_waiters, []
        for future in flushed:
            if not future.done():
                future.set_result(None)

    def _has_work(self) -> bool:
        return bool(
            self._waiters or self._settles or self._pending or self._retry_units or self._renewals
        )

    async def _send(self) -> None:
        """One script call: retried settlements, new ones, renewals, then admissions in order."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        waiters, self._waiters = self._waiters, []
        units = self._take_units()
        batch = Batch(self._names)
        for unit_id, records, usage in units:
            batch.add_unit(unit_id, records, usage)
        for bucket, member in self._renewals:
            batch.add_renewal(bucket, member)
        self._renewals = []
        for waiter in waiters:
            batch.add_admission(waiter.member, waiter.ask)
        try:
            payload = batch.payload(self._lease_ttl_s)
        except TypeError:  # orjson's JSONEncodeError: a value out of range slipped past the clamps
            # Sending it again would fail again and stall every admission behind it.
            log.exception("rate limit batch cannot be encoded; %d settlement units dropped", len(units))
            self._abandon(waiters)
            return
        self.script_calls += 1
        expiry = self._expire_at_deadlines(waiters)
        raw: bytes | None = None
        try:
            raw = await self._bounded(self._batch_script(keys=batch.keys, args=[payload]))
        finally:
            if expiry is not None:
                expiry.cancel()
            if raw is None:
                self._retry_units = units
                self._abandon(waiters)
        if raw is None:
            return
        for waiter, result in zip(waiters, orjson.loads(raw)):
            self._resolve(waiter, result)

    def _take_units(self) -> list[Unit]:
        units, self._retry_units = self._retry_units, []
        records, self._settles = self._settles, []
        usage = self._pending.take() if self._pending else None
        if records or usage is not None:
            self._seq += 1
            units.append((f"{self._replica}:u{self._seq}", records, usage))
        return units

    async def _bounded(self, call: Awaitable[T]) -> T | None:
        """`call`'s result within timeout_ms, or None after a failure (which is counted)."""
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call
        except FAILURES as exc:
            self._failures += 1
            if isinstance(exc, RedisConnectionError) or self._failures >= FAILURES_TO_DEGRADE:
                self._degrade(exc)
            return None
        self._failures = 0
        return result

    def _degrade(self, exc: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        if self._closed:  # shutting down: stop sending, nothing to probe for
            log.warning("redis unreachable at shutdown (%r); pending settlements are lost", exc)
            return
        mode = "fail_closed" if self._fallback.fail_closed else "fail_open"
        log.warning("redis unreachable (%r); rate limits now %s", exc, mode)
        self._abandon(self._waiters)
        self._waiters = []
        self._spawn("probe", self._probe())

    async def _probe(self) -> None:
        while not self._closed:
            await asyncio.sleep(PROBE_S)
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._client.ping()
            except FAILURES:
                continue
            log.warning("redis reachable again: rate limits shared again")
            self._failures = 0
            self._degraded = False
            self._ensure_flusher().set()
            return

    def _expire_at_deadlines(self, waiters: list[_Waiter]) -> asyncio.TimerHandle | None:
        """One timer per call: admissions still waiting at their deadline fall back."""
        if not waiters:
            return None
        return self._running_loop().call_at(waiters[0].deadline, self._expire, waiters)

    def _expire(self, waiters: list[_Waiter]) -> None:
        loop = self._running_loop()
        for index, waiter in enumerate(waiters):
            if waiter.deadline > loop.time() + 0.001:
                loop.call_at(waiter.deadline, self._expire, waiters[index:])
                return
            if not waiter.future.done():
                waiter.future.set_result(None)

    def _abandon(self, waiters: list[_Waiter]) -> None:
        """Admissions whose call failed fall back; any lease Redis may still have given goes."""
        for waiter in waiters:
            if not waiter.future.done():
                waiter.future.set_result(None)
            leases = tuple(b for b in waiter.ask.buckets if b.dimension == CONCURRENCY)
            if leases:
                self._settles.append((waiter.member, leases, (), 0))

    def _resolve(self, waiter: _Waiter, result: list[Any]) -> None:
        outcome, seen = decode_outcome(waiter.member, waiter.ask, result)
        budget = waiter.ask.budget
        if seen is not None and budget is not None:
            self._fallback.see_budget(budget.key, budget.period, *seen)
        if not waiter.future.done():
            if isinstance(outcome, Grant) and outcome.leases:
                self._live[outcome.id] = outcome
            waiter.future.set_result(outcome)
        elif isinstance(outcome, Grant):
            # Its admission already fell back (deadline) or went away (cancelled): give it back.
            self._settles.append((outcome.id, outcome.leases, outcome.reserved, 0))

    async def _heartbeat(self) -> None:
        if self._degraded:
            return
        ttl = self._heartbeat_s * LIVE_HEARTBEATS
        clock = self.period_clock
        sent_at = clock.wall()
        answer = await self._bounded(
            self._heartbeat_script(keys=[self._names.replicas], args=[self._replica, ttl])
        )
        if answer is not None:
            count, seconds, micros = answer
            clock.see_server_time(int(seconds) + int(micros) / 1_000_000, sent_at, clock.wall())
            self._fallback.see_replicas(max(1, int(count)))

    async def _renew(self) -> None:
        """Store-wide: every live lease gets a fresh expiry in the next script call."""
        if self._degraded or not self._live:
            return
        self._renewals = [(b, grant.id) for grant in self._live.values() for b in grant.leases]
        self._ensure_flusher().set()


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancels until every task has ended: on Python 3.11, redis-py's `wait_for` may swallow a
    cancel that lands as its command completes, and the task then carries on."""
    while tasks:
        for task in tasks:
            task.cancel()
        _, pending = await asyncio.wait(tasks, timeout=0.1)
        tasks = list(pending)


def _connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client that fails fast: no retries of its own, socket timeouts at timeout_ms."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
    )
