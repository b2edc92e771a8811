"""(h) The Anthropic Messages API: `/v1/messages` passed through to an `anthropic` provider and
converted to an `openai` one, against the chat completion pass-through, in one gateway and the
same rounds.

JSON is wrk on nginx's fixed answers (a `chat.completion` on `/v1/chat/completions`, the same
answer as an Anthropic `message` on `/v1/messages`); streams are the harness's client on the SSE
server's 20 chunks without gaps (OpenAI's chunks, or Anthropic's named events). The three paths
of a load differ only by the client API and the provider type; their order rotates from round
to round. Each messages figure carries its ratio to the chat pass-through's.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

from .configs import DEFAULT, provider
from .harness import Bench, Hop, median_row, with_ratios
from .load import FILLER, chat_body, write_lua
from .streams import HEADERS

CHAT, PASS, CONVERTED = "chat, openai pass-through", "messages, anthropic pass-through", "messages, openai converted"
PATHS = (CHAT, PASS, CONVERTED)
# most CPU per request / stream over the chat pass-through's (issue: pass-through within 1.1×)
TARGETS = {PASS: 1.1}
RATIO_KEYS = ("rate", "p50_ms", "p99_ms", "cpu_us")
MESSAGE_STOP = b"event: message_stop"


@dataclass(frozen=True)
class Case:
    load: str  # "json" or "stream"
    path: str
    model: str


def cases() -> list[Case]:
    slug = {CHAT: "chat", PASS: "pass", CONVERTED: "conv"}
    return [Case(load, path, f"bench-msg-{load}-{slug[path]}") for load in ("json", "stream") for path in PATHS]


def providers(bench: Bench) -> dict[str, dict[str, Any]]:
    chunks = bench.params.stream_chunks
    openai_json, openai_sse = bench.nginx + "/v1", f"{bench.sse}/sse/{chunks}/0/v1"
    bases = {("json", CHAT): openai_json, ("json", PASS): bench.nginx, ("json", CONVERTED): openai_json,
             ("stream", CHAT): openai_sse, ("stream", PASS): f"{bench.sse}/anthropic/{chunks}/0",
             ("stream", CONVERTED): openai_sse}
    return {case.model: provider(bases[case.load, case.path], kind="anthropic" if case.path == PASS else "openai")
            for case in cases()}


def messages_body(*, model: str, size: int = 1024, stream: bool = False) -> bytes:
    """The chat benchmark's request as a Messages request of about the same size."""
    data: dict[str, Any] = {
        "model": model,
        "max_tokens": 256,
        "system": "You are a careful analyst. Answer in short paragraphs.",
        "messages": [
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "Which figures should I compare first?"},
            {"role": "user", "content": " ".join(f"word{i}" for i in range(12))},
        ],
        "temperature": 0.7,
    }
    if stream:
        data["stream"] = True
    missing = max(0, size - len(orjson.dumps(data)))
    data["messages"][0]["content"] = (FILLER * (missing // len(FILLER) + 1))[:missing]
    return orjson.dumps(data)


def body_of(case: Case) -> bytes:
    if case.path == CHAT:
        return chat_body(model=case.model, stream=case.load == "stream")
    return messages_body(model=case.model, stream=case.load == "stream")


def url_of(hop: Hop, case: Case) -> str:
    return hop.chat_url if case.path == CHAT else hop.base + "/v1/messages"


def messages(bench: Bench) -> dict[str, Any]:
    params = bench.params
    bench.log(f"(h) /v1/messages, passed through and converted, against chat's pass-through: JSON and "
              f"{params.stream_chunks}-chunk streams")
    count = max(3, params.rounds)
    rounds: dict[Case, list[dict[str, Any]]] = {case: [] for case in cases()}
    with bench.gateway("llm-proxy-messages", providers(bench)) as hop:
        check_answers(hop)
        for number in range(count):
            bench.log(f"(h) round {number + 1}/{count}")
            for case in _order(number):
                rounds[case].append(_measure(bench, hop, case))
    rows = []
    for load in ("json", "stream"):
        rows += _rows(load, {case.path: rounds[case] for case in cases() if case.load == load}, params.stream_chunks)
    return {"id": "h", "title": "(h) /v1/messages: Anthropic pass-through and conversion against chat's pass-through",
            "columns": _columns(), "rows": rows,
            "rounds": {f"{case.load}, {case.path}": rows for case, rows in rounds.items()},
            "notes": _notes(bench, count)}


def _order(number: int) -> list[Case]:
    """JSON, then streams; the three paths rotated so each goes first in turn."""
    rotated = PATHS[number % 3:] + PATHS[:number % 3]
    return sorted(cases(), key=lambda case: (case.load != "json", rotated.index(case.path)))


def _measure(bench: Bench, hop: Hop, case: Case) -> dict[str, Any]:
    label = f"{case.load}, {case.path}"
    if case.load == "json":
        script = write_lua(bench.workdir, body_of(case), case.model)
        row = bench.measure(hop, url_of(hop, case), script, label)
        return {**row, "rate": row["rps"], "errors_total": row["errors"]}
    done = b"data: [DONE]" if case.path == CHAT else MESSAGE_STOP
    row = bench.measure_streams(hop, url_of(hop, case), body_of(case), label, done=done)
    return {**row, "rate": row["streams_per_s"], "p50_ms": row["total_p50_ms"], "p99_ms": row["total_p99_ms"]}


def _rows(load: str, by_path: dict[str, list[dict[str, Any]]], chunks: int) -> list[dict[str, Any]]:
    name = "JSON, ~1 KB body" if load == "json" else f"stream, {chunks} chunks, no gap"
    base_rounds = by_path[CHAT]
    base = {"load": name, "path": CHAT, **median_row(base_rounds)}
    rows = [base]
    for path in (PASS, CONVERTED):
        mine = with_ratios({"load": name, "path": path, **median_row(by_path[path])}, base, RATIO_KEYS, suffix="pass")
        per_round = [m["cpu_us"] / b["cpu_us"] for b, m in zip(base_rounds, by_path[path]) if b.get("cpu_us") and m.get("cpu_us")]
        if len(per_round) > 1:
            mine["cpu_ratio_range"] = f"{min(per_round):.2f}–{max(per_round):.2f}×"
        ratio, target = mine.get("cpu_us_x_pass"), TARGETS.get(path)
        if isinstance(ratio, float) and target is not None:
            mine["target"] = f"≤ {target:.1f}×: {'met' if ratio <= target else 'missed'} ({ratio:.2f}×)"
        rows.append(mine)
    return rows


def _columns() -> list[list[Any]]:
    return [["load", "load", "text", None], ["path", "path", "text", None],
            ["req/s or streams/s", "rate", "n0", "rate_x_pass"],
            ["p50 ms", "p50_ms", "f2", "p50_ms_x_pass"], ["p99 ms", "p99_ms", "f2", "p99_ms_x_pass"],
            ["CPU µs per request / stream", "cpu_us", "n0", "cpu_us_x_pass"],
            ["CPU over rounds", "cpu_us_range", "text", None],
            ["/ chat pass-through CPU, per round", "cpu_ratio_range", "text", None],
            ["target (CPU)", "target", "text", None],
            ["events/stream", "events_per_stream", "f1", None], ["errors", "errors_total", "n0", None]]


def _notes(bench: Bench, rounds: int) -> list[str]:
    return [
        (f"One llm-proxy ({DEFAULT.note}) serves six models: per load, chat completions passed through to "
         "an `openai` provider (the baseline), Messages requests passed through to an `anthropic` provider, "
         "and Messages requests converted to an `openai` provider, all on the same upstream processes; "
         "`(N×)` is a figure over the chat pass-through's."),
        ("JSON: wrk, ~1 KB bodies of the same conversation in each API; nginx answers a fixed `chat.completion` "
         f"or the same answer as an Anthropic `message`. Streams: {bench.params.stream_concurrency} concurrent, "
         "the SSE server's chunks or Anthropic's named events, each stream read to its end marker."),
        f"Medians over {rounds} rounds (at least 3), the order of the three paths rotating.",
        "Target (Anthropic API issue): the messages pass-through within 1.1× the chat pass-through's CPU.",
        "Before the load, one request on each path: every answer has the upstream's text, every stream its end marker.",
    ]


def check_answers(hop: Hop) -> None:
    """One request of each case; RuntimeError unless it answered 200 with text (and, for a stream,
    its end marker): a load of errors measures nothing."""
    for case in cases():
        request = urllib.request.Request(url_of(hop, case), body_of(case), HEADERS)
        with urllib.request.urlopen(request, timeout=10) as response:
            body: bytes = response.read()
        marker = (b"data: [DONE]" if case.path == CHAT else MESSAGE_STOP) if case.load == "stream" else b'"text"'
        if case.path == CHAT and case.load == "json":
            marker = b'"content"'
        if marker not in body:
            raise RuntimeError(f"{case.load}, {case.path}: unexpected answer {body[:300]!r}")
