"""CPU per request of the guardrail stage, in process, beside what parsing the same body costs.

For a 1 KB and a 100 KB chat request (prose with the numbers, dates and versions real prompts
carry, and no PII, the usual case), in the same run (rounds taking turns, the least of each
kept): parsing the body (`orjson.loads`, and the gateway's whole validation), the request
stage without guardrails (what every other key pays), with the `pii` guardrail (every
built-in category, action block), and with it on the same prose holding one e-mail address
(the detectors read every text). Target: the guardrail adds at most what parsing the body
costs at each size. Also a stream's hold-back: CPU per event of a 20-event answer through the
response guardrail, against the same events passed through.

    .venv/bin/python -m bench.guardrails [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import orjson
import uvloop
from prometheus_client import CollectorRegistry

from proxy.call import Call
from proxy.configfile import parse_config
from proxy.errors import GatewayError
from proxy.gateway import Gateway
from proxy.guardrails.answers import guard_stream
from proxy.guardrails import prefilter, stage
from proxy.guardrails.stage import guard_request
from proxy.metrics import Metrics
from proxy.ratelimit import LocalLimiter
from proxy.streaming import SseScanner
from proxy.validation import parse_chat_request

PROSE = (
    "The quarterly report of 2024-03-31 lists revenue by region (EMEA up 12.5%, APAC 8.1%), the "
    "cost of each of the 14 product lines and release 3.2.1 of the tooling; order 48213 shipped. "
)
CONFIG = """
keys:
  - {name: plain, key: k-plain}
  - {name: guarded, key: k-guarded, guardrails: [pii]}
providers:
  mock: {type: mock}
models:
  bench: {targets: [{provider: mock}]}
guardrails:
  pii: {type: pii, action: block}
  answers: {type: pii, action: redact, apply_to: [response]}
"""


def body_of(size: int, tail: str = "") -> bytes:
    words = (PROSE * (size // len(PROSE) + 1))[: size - 120 - len(tail)] + tail
    return orjson.dumps({"model": "bench", "messages": [
        {"role": "system", "content": "You are a careful analyst."}, {"role": "user", "content": words}]})


def interleaved(runners: dict[str, Callable[[], object]], seconds: float, rounds: int = 9) -> dict[str, float]:
    """CPU microseconds per call of each runner: the least of `rounds` rounds that take turns
    (on a shared machine a round can lose the CPU to a neighbour; none can run faster than
    the code does), each about `seconds / rounds` long."""
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(rounds):
        for name, run in runners.items():
            best[name] = min(best[name], cpu_us(run, seconds / rounds))
    return best


def cpu_us(run: Callable[[], object], seconds: float) -> float:
    """Mean CPU microseconds per call over about `seconds` of repeated calls."""
    count, started = 0, time.process_time()
    while (elapsed := time.process_time() - started) < seconds:
        for _ in range(20):
            run()
        count += 20
    return elapsed / count * 1e6


def stage_runner(gateway: Gateway, key_name: str, body: bytes, blocked: bool = False) -> Callable[[], object]:
    key = next(k for k in gateway.keys.values() if k.name == key_name)
    chat = parse_chat_request(body)

    def run() -> object:
        call = Call(gateway=gateway, request_id="req_bench", started=0.0)
        call.key, call.model, call.parsed, call.body = key, gateway.models["bench"], chat, body
        coroutine = guard_request(call)
        try:
            coroutine.send(None)  # never suspends below the size scanned in a worker thread
        except StopIteration:
            assert not blocked
            return None
        except GatewayError:
            assert blocked
            return None
        raise AssertionError("the stage suspended")

    return run


def stream_events(count: int) -> list[bytes]:
    words = (PROSE * 2).split(" ")[:count]
    return [
        b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "bench",
                                  "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
        + b"\n\n"
        for word in words
    ] + [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n', b"data: [DONE]\n\n"]


def stream_runner(gateway: Gateway, key_name: str, events: list[bytes]) -> Callable[[], object]:
    key = next(k for k in gateway.keys.values() if k.name == key_name)

    def run() -> object:
        call = Call(gateway=gateway, request_id="req_bench", started=0.0)
        call.key, call.model = key, gateway.models["bench"]
        reader = guard_stream(call, SseScanner(strip_usage=False))
        return [reader.feed(event) for event in events]

    return run


def _vectors() -> bool:
    from proxy.guardrails import _prefilter

    on = _prefilter.vectors(True)
    _prefilter.vectors(on)
    return on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    uvloop.install()
    # Measured inline: above OFFLOAD_BYTES a serving gateway scans in a worker thread, the same
    # CPU plus a hand-off (tens of µs) that keeps the event loop free meanwhile.
    stage.OFFLOAD_BYTES = 1 << 40
    config = parse_config(CONFIG, os.environ)
    gateway = Gateway(config=config, limiter=LocalLimiter(), metrics=Metrics(CollectorRegistry()))
    print(f"prefilter: {'compiled' if prefilter.NATIVE else 'NOT BUILT (every text goes to the detectors)'}"
          f"{', AVX2' if prefilter.NATIVE and _vectors() else ''}")
    print(f"{'µs CPU per request':<44}{'1 KB':>10}{'100 KB':>10}")
    rows: dict[str, list[float]] = {}
    for size in (1024, 100 * 1024):
        body, found = body_of(size), body_of(size, "write to jane.roe@example.com")
        runners = {
            "orjson.loads of the body": lambda body=body: orjson.loads(body),
            "validate (parse + checks)": lambda body=body: parse_chat_request(body),
            "guardrail stage, none attached": stage_runner(gateway, "plain", body),
            "guardrail stage, pii (all categories)": stage_runner(gateway, "guarded", body),
            # the same prose with one e-mail address at its end: every text is read by the
            # detectors, and the request blocked
            "  ... holding one e-mail (blocked)": stage_runner(gateway, "guarded", found, blocked=True),
        }
        for name, figure in interleaved(runners, args.seconds).items():
            rows.setdefault(name, []).append(figure)
    for name, figures in rows.items():
        print(f"{name:<44}" + "".join(f"{figure:>10.1f}" for figure in figures))
    added = [g - n for g, n in zip(rows["guardrail stage, pii (all categories)"], rows["guardrail stage, none attached"])]
    ratio = [a / p for a, p in zip(added, rows["orjson.loads of the body"])]
    print(f"{'pii added / orjson.loads (target <= 1)':<44}" + "".join(f"{r:>10.2f}" for r in ratio))
    events = stream_events(20)
    gateway_keys = config.keys
    assert gateway_keys
    plain = cpu_us(stream_runner(gateway, "plain", events), args.seconds)
    answers = Gateway(config=parse_config(CONFIG.replace("guardrails: [pii]", "guardrails: [answers]"), os.environ),
                      limiter=LocalLimiter(), metrics=None)
    guarded = cpu_us(stream_runner(answers, "guarded", events), args.seconds)
    print(f"stream of {len(events)} events: {plain / len(events):.1f} µs per event passed through, "
          f"{guarded / len(events):.1f} µs with the response guardrail (hold-back and redaction)")


if __name__ == "__main__":
    main()
