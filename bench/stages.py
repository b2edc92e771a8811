"""CPU per request of each stage of llm-proxy's own request path, measured alone, in process.

The cost ladder of `bench/run` measures whole requests, where a 10 µs feature hides in 10–20 %
of machine noise, and py-spy over-weights lines next to system calls. This times each stage's
own functions in a loop (warm caches, no I/O), with the benchmarks' every-feature config (key
limits in process, 3 accounts, metrics, access log), so the stages can be compared with each
other exactly. In a serving process each costs more (colder caches), so the sum is a floor for
what the features add. Below the total, the body rewrite (`Call.upstream_request` when the
upstream's model name differs or usage must be asked for), which only some requests need. Last,
what a provider does per request on the pass-through (`openai`) and on the converted path
(`anthropic`: `to_anthropic`, `from_anthropic`, `AnthropicStream.feed`, through the provider's own
methods as `forward` calls them), on the answers and streams of the benchmarks' fake upstreams.

    .venv/bin/python -m bench.stages [--iterations N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import orjson
import uvloop
import yaml
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.accesslog import AccessLog
from proxy.admission import admit, ratelimit_headers, settle_limits
from proxy.call import Call
from proxy.configfile import parse_config
from proxy.faults import Fault, Verdict
from proxy.clock import Clock
from proxy.gateway import Gateway
from proxy.metrics import Metrics
from proxy.ratelimit import LocalLimiter
from proxy.validation import parse_chat_request

from .configs import LADDER, gateway_config, provider
from .load import FILLER, GATEWAY_KEY, chat_body
from .sse_server import anthropic_events, openai_events
from .upstreams import ANTHROPIC_MESSAGE, CHAT_COMPLETION

MODEL = "bench-chat"
UPSTREAM_MODEL = "bench-chat-2024-08-06"
SUCCESS = Verdict(Fault.NONE)
UPSTREAM_HEADERS = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", "Content-Length": "614"}))
STREAM_CHUNKS = 20
Stage = Callable[[], Awaitable[None]]


def build_gateway(step_index: int = -1) -> Gateway:
    """The last ladder step's config (or another's), with the in-process limiter (no Redis round
    trips here)."""
    step = LADDER[step_index]
    data = gateway_config(port=0, providers={MODEL: provider("http://127.0.0.1:9/v1", step.accounts)}, step=step)
    config = parse_config(yaml.safe_dump(data), os.environ)
    return Gateway(config=config, limiter=LocalLimiter(), metrics=Metrics(CollectorRegistry()))


def stages(gateway: Gateway, access_log: AccessLog) -> dict[str, Callable[[], Awaitable[None]]]:
    """Each stage as one request would run it; each returns to the same state (settles what it takes)."""
    body = chat_body(model=MODEL)
    chat = parse_chat_request(body)
    key = gateway.authenticate(GATEWAY_KEY)
    assert key is not None
    model = gateway.models[MODEL]
    timeouts = next(iter(gateway.config.providers.values())).timeouts
    # the levels an admission leaves, for the header stage alone
    levels = {bucket.id: (float(bucket.limit - 1), 0.01) for bucket in gateway.buckets.keys[key.name]}

    def new_call() -> Call:
        call = Call(gateway=gateway, request_id="req_0123456789ab0000000001", started=time.perf_counter())
        call.key, call.chat, call.model, call.body = key, chat, model, body
        return call

    async def authenticate() -> None:
        gateway.authenticate(GATEWAY_KEY)

    async def validate() -> None:
        parse_chat_request(body)

    async def limits() -> None:
        call = new_call()
        await admit(call)
        call.prompt_tokens, call.completion_tokens = 5, 2
        settle_limits(call)

    async def headers() -> None:
        call = new_call()
        call.extra_headers.update(ratelimit_headers(gateway.buckets.keys[key.name], levels))
        call.response_headers({"Content-Type": "application/json"})

    async def scheduling() -> None:
        call = new_call()
        now = asyncio.get_running_loop().time()
        choice = gateway.accounts.choose(model=model, group=key.group, tried=call.tried, session=None, now=now)
        gateway.retry_budget.record_first(now)
        attempt = gateway.accounts.begin(choice, now)
        gateway.accounts.finish(attempt, SUCCESS, now, headers=UPSTREAM_HEADERS)

    async def deadline() -> None:
        clock = Clock(timeouts)
        async with clock.timer:
            pass

    async def answer() -> None:
        call = new_call()
        parsed = orjson.loads(CHAT_COMPLETION)
        call.record_usage(parsed.get("usage"))

    async def metrics() -> None:
        assert gateway.metrics is not None
        m = gateway.metrics
        m.record_request(api="chat", model=MODEL, key=key.name, status=200, error_type="", stream=False,
                         duration_s=0.012, upstream_s=0.01)
        m.record_tokens(api="chat", model=MODEL, key=key.name, prompt=5, completion=2)
        m.ttft(("chat", MODEL, MODEL)).observe(0.011)
        m.record_attempt(provider=MODEL, account="acct-1", outcome="success", duration_s=0.01)

    async def log_line() -> None:
        access_log.write({
            "request_id": "req_0123456789ab0000000001", "key": key.name, "model": MODEL,
            "provider": MODEL, "account": "acct-1", "attempts": 1, "status": 200, "error_type": None,
            "prompt_tokens": 5, "completion_tokens": 2, "ttft_ms": 1.234, "duration_ms": 2.345,
            "stream": False,
        })

    return {
        "authenticate (SHA-256 of the key, lookup)": authenticate,
        "validate a 1 KB body (parse once, check)": validate,
        "limits in process: admit + settle (key rpm + tpm)": limits,
        "x-ratelimit-* and x-request-id headers": headers,
        "scheduling over 3 accounts: choose, begin, finish": scheduling,
        "attempt deadline (Clock on the shared deadline timer)": deadline,
        "parse the upstream answer for usage (614 B)": answer,
        "metrics (8 observations)": metrics,
        "access log line (JSON, buffered)": log_line,
    }


def rewrites(gateway: Gateway) -> dict[str, Callable[[], Awaitable[None]]]:
    """`Call.upstream_request` on bodies that must change, each on a new call (it caches per call)."""
    small = chat_body(model=MODEL)
    stream = orjson.dumps({**orjson.loads(small), "stream": True})
    messages = [
        {"role": ("user", "assistant")[i % 2], "content": (FILLER * 3)[:480 + i % 40]} for i in range(200)
    ]
    large = orjson.dumps({"model": MODEL, "messages": messages, "temperature": 0.7, "max_tokens": 256})

    def rewrite(body: bytes, upstream_model: str) -> Callable[[], Awaitable[None]]:
        chat = parse_chat_request(body)

        async def stage() -> None:
            call = Call(gateway=gateway, request_id="req_0123456789ab0000000001", started=0.0)
            call.body, call.chat = body, chat
            call.upstream_request(upstream_model)

        return stage

    return {
        f"rewrite {len(small) / 1000:.0f} KB: upstream model name": rewrite(small, UPSTREAM_MODEL),
        f"rewrite {len(stream) / 1000:.0f} KB stream: include_usage added": rewrite(stream, MODEL),
        f"rewrite {len(large) / 1000:.0f} KB, 200 messages: upstream model name": rewrite(large, UPSTREAM_MODEL),
    }


def conversions() -> dict[str, tuple[Stage, Stage]]:
    """Each provider stage as (pass-through, converted): one gateway with an `openai` and an
    `anthropic` provider, each fed its upstream's version of the same answer."""
    unused = "http://127.0.0.1:9"
    data = gateway_config(port=0, providers={"pass": provider(unused + "/v1"),
                                             "converted": provider(unused, kind="anthropic")})
    gateway = Gateway(config=parse_config(yaml.safe_dump(data), os.environ), limiter=LocalLimiter(),
                      metrics=Metrics(CollectorRegistry()))
    passed = _provider_stages(gateway, "pass", CHAT_COMPLETION, openai_events(STREAM_CHUNKS, True))
    converted = _provider_stages(gateway, "converted", ANTHROPIC_MESSAGE, anthropic_events(STREAM_CHUNKS))
    return {name: (passed[name], converted[name]) for name in passed}


def _provider_stages(gateway: Gateway, name: str, answer: bytes, events: tuple[bytes, ...]) -> dict[str, Stage]:
    """What `forward` asks of the provider `name`: prepare the request, read the answer, read a
    stream (whole, as a stream without gaps arrives, or an event per read, as a slow one does)."""
    upstream = gateway.providers[name]

    def new_call(stream: bool) -> Call:
        body = chat_body(model=name, stream=stream)
        call = Call(gateway=gateway, request_id="req_0123456789ab0000000001", started=0.0)
        call.chat, call.model, call.body = parse_chat_request(body), gateway.models[name], body
        return call

    json_call, stream_call = new_call(False), new_call(True)
    json_prepared, stream_prepared = upstream.prepare(json_call, name), upstream.prepare(stream_call, name)
    whole = b"".join(events)

    async def prepare() -> None:
        upstream.prepare(json_call, name)

    async def read_answer() -> None:
        upstream.answer(answer, json_prepared)

    async def stream_whole() -> None:
        upstream.stream(stream_prepared).feed(whole)

    async def stream_by_event() -> None:
        reader = upstream.stream(stream_prepared)
        for event in events:
            reader.feed(event)

    return {
        "request: prepare (1 KB body)": prepare,
        "answer: read for usage / convert (614 / 561 B)": read_answer,
        f"stream of {STREAM_CHUNKS} chunks, one read": stream_whole,
        f"stream of {STREAM_CHUNKS} chunks, an event per read": stream_by_event,
    }


async def measure(stage: Callable[[], Awaitable[None]], iterations: int) -> float:
    for _ in range(min(2000, iterations)):
        await stage()
    started = time.process_time()
    for _ in range(iterations):
        await stage()
    return (time.process_time() - started) / iterations * 1e6


async def main_async(iterations: int, step_index: int = -1) -> None:
    gateway = build_gateway(step_index)
    with open(os.devnull, "wb") as devnull:
        access_log = AccessLog(fd=devnull.fileno())
        empty = await measure(_nothing, iterations)
        rows = [(name, await _net(stage, iterations, empty)) for name, stage in stages(gateway, access_log).items()]
        access_log.flush()
    extra = [(name, await _net(stage, iterations, empty)) for name, stage in rewrites(gateway).items()]
    width = max(len(name) for name, _ in rows + extra)
    print(f"{'stage':<{width}}  µs/request")
    for name, us in rows:
        print(f"{name:<{width}}  {us:10.2f}")
    print(f"{'total':<{width}}  {sum(us for _, us in rows):10.2f}")
    print("only when the body must change (not in the total):")
    for name, us in extra:
        print(f"{name:<{width}}  {us:10.2f}")
    await _print_conversions(iterations, empty)
    print(f"(each net of an empty awaited call, {empty:.2f} µs; {iterations:,} iterations, uvloop)")


async def _print_conversions(iterations: int, empty: float, repeats: int = 5) -> None:
    """Each pair measured `repeats` times, alternating, and the least of each kept: on a shared
    machine a figure alone moves by 30 %, the least much less."""
    rows = []
    for name, pair in conversions().items():
        times: tuple[list[float], list[float]] = ([], [])
        for _ in range(repeats):
            for stage, found in zip(pair, times):
                found.append(await _net(stage, max(1, iterations // repeats), empty))
        rows.append((name, min(times[0]), min(times[1])))
    title = f"provider stage (least of {repeats}, alternating)"
    width = max(len(name) for name, _, _ in rows + [(title, 0, 0)])
    print(f"\n{title:<{width}}  pass-through  converted  converted − pass-through µs")
    for name, passed, converted in rows:
        print(f"{name:<{width}}  {passed:12.2f}  {converted:9.2f}  {converted - passed:+10.2f}")


async def _net(stage: Callable[[], Awaitable[None]], iterations: int, empty: float) -> float:
    return max(0.0, await measure(stage, iterations) - empty)


async def _nothing() -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50_000)
    parser.add_argument("--without-cost", action="store_true",
                        help="the step before the last: no prices, no budget_usd")
    args = parser.parse_args()
    uvloop.run(main_async(args.iterations, -2 if args.without_cost else -1))


if __name__ == "__main__":
    main()
