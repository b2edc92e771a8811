"""(g) The converted path: the same load through an `anthropic` provider and the `openai`
pass-through, on the same fast fake upstreams, in one gateway and in the same rounds.

JSON is wrk on nginx's fixed answer (a `chat.completion` for the pass-through, the same answer
as an Anthropic `message` on `/v1/messages` for the converted path); streams are the harness's
client on the SSE server's 20 chunks without gaps (OpenAI's chunks, or Anthropic's named
events). One gateway serves all four models, so the two paths differ only by provider type, and
the order of the two alternates from round to round. The converted figures carry their ratio to
the pass-through's, checked against the targets of the protocol-conversion issue.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson

from .configs import DEFAULT, provider
from .harness import Bench, Hop, median_row, with_ratios
from .load import chat_body, write_lua
from .sse_server import STREAM_PROMPT_TOKENS
from .streams import HEADERS
from .upstreams import ANSWER_TEXT, COMPLETION_TOKENS, PROMPT_TOKENS

PASS, CONVERTED = "openai pass-through", "anthropic, converted"
TARGETS = {"json": 1.3, "stream": 1.5}  # most CPU per request / stream of converted over pass-through
RATIO_KEYS = ("rate", "p50_ms", "p99_ms", "cpu_us")


@dataclass(frozen=True)
class Case:
    """One load on one path: the model the gateway routes to that path's provider."""

    load: str  # "json" or "stream"
    path: str  # PASS or CONVERTED
    model: str


def cases() -> list[Case]:
    return [Case(load, path, f"bench-{load}-{'pass' if path == PASS else 'anthropic'}")
            for load in ("json", "stream") for path in (PASS, CONVERTED)]


def providers(bench: Bench) -> dict[str, dict[str, Any]]:
    """Per model: nginx or the SSE server, as an OpenAI-compatible API or as Anthropic's."""
    chunks = bench.params.stream_chunks
    bases = {("json", PASS): bench.nginx + "/v1", ("json", CONVERTED): bench.nginx,
             ("stream", PASS): f"{bench.sse}/sse/{chunks}/0/v1",
             ("stream", CONVERTED): f"{bench.sse}/anthropic/{chunks}/0"}
    return {case.model: provider(bases[case.load, case.path], kind="openai" if case.path == PASS else "anthropic")
            for case in cases()}


def converted(bench: Bench) -> dict[str, Any]:
    params = bench.params
    bench.log(f"(g) converted path against the pass-through: JSON and {params.stream_chunks}-chunk streams")
    count = rounds_of(bench)
    rounds: dict[Case, list[dict[str, Any]]] = {case: [] for case in cases()}
    with bench.gateway("llm-proxy-converted", providers(bench)) as hop:
        check_answers(hop, params.stream_chunks)
        for number in range(count):
            bench.log(f"(g) round {number + 1}/{count}")
            for case in _order(number):
                rounds[case].append(_measure(bench, hop, case))
    rows = []
    for load in ("json", "stream"):
        pass_rounds, conv_rounds = (rounds[case] for case in cases() if case.load == load)
        rows += _rows(load, pass_rounds, conv_rounds, bench.params.stream_chunks)
    return {"id": "g", "title": "(g) Converted path: an anthropic provider against the openai pass-through",
            "columns": _columns(count), "rows": rows, "rounds": _raw(rounds), "notes": _notes(bench, count)}


def rounds_of(bench: Bench) -> int:
    """The run's rounds, but at least two: one pair's ratio moves by 30 % on a shared machine, and
    two let each path go first once."""
    return max(2, bench.params.rounds)


def _order(number: int) -> list[Case]:
    """JSON, then streams; of each, the pass-through first in even rounds, the converted path in odd ones."""
    first = PASS if number % 2 == 0 else CONVERTED
    return sorted(cases(), key=lambda case: (case.load != "json", case.path != first))


def _measure(bench: Bench, hop: Hop, case: Case) -> dict[str, Any]:
    label = f"{case.load}, {case.path}"
    if case.load == "json":
        script = write_lua(bench.workdir, chat_body(model=case.model), case.model)
        row = bench.measure(hop, hop.chat_url, script, label)
        return {**row, "rate": row["rps"], "errors_total": row["errors"]}
    row = bench.measure_streams(hop, hop.chat_url, chat_body(model=case.model, stream=True), label)
    return {**row, "rate": row["streams_per_s"], "p50_ms": row["total_p50_ms"], "p99_ms": row["total_p99_ms"]}


def _rows(
    load: str, pass_rounds: list[dict[str, Any]], conv_rounds: list[dict[str, Any]], chunks: int
) -> list[dict[str, Any]]:
    """The medians of each path; the converted one with its ratios, per round too, and its target."""
    name = "JSON, ~1 KB body" if load == "json" else f"stream, {chunks} chunks, no gap"
    base = {"load": name, "path": PASS, **median_row(pass_rounds)}
    mine = with_ratios({"load": name, "path": CONVERTED, **median_row(conv_rounds)}, base, RATIO_KEYS, suffix="pass")
    per_round = [c["cpu_us"] / p["cpu_us"] for p, c in zip(pass_rounds, conv_rounds)
                 if p.get("cpu_us") and c.get("cpu_us")]
    if len(per_round) > 1:
        mine["cpu_ratio_range"] = f"{min(per_round):.2f}–{max(per_round):.2f}×"
    ratio, target = mine.get("cpu_us_x_pass"), TARGETS[load]
    if isinstance(ratio, float):
        mine["target"] = f"≤ {target:.1f}×: {'met' if ratio <= target else 'missed'} ({ratio:.2f}×)"
    return [base, mine]


def _columns(rounds: int) -> list[list[Any]]:
    spread = [["CPU over rounds", "cpu_us_range", "text", None],
              ["converted / pass-through CPU, per round", "cpu_ratio_range", "text", None]] if rounds > 1 else []
    return [["load", "load", "text", None], ["path", "path", "text", None],
            ["req/s or streams/s", "rate", "n0", "rate_x_pass"],
            ["p50 ms", "p50_ms", "f2", "p50_ms_x_pass"], ["p99 ms", "p99_ms", "f2", "p99_ms_x_pass"],
            ["CPU µs per request / stream", "cpu_us", "n0", "cpu_us_x_pass"], *spread,
            ["target (CPU)", "target", "text", None],
            ["events/stream", "events_per_stream", "f1", None], ["errors", "errors_total", "n0", None]]


def _raw(rounds: dict[Case, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {f"{case.load}, {case.path}": rows for case, rows in rounds.items()}


def _notes(bench: Bench, rounds: int) -> list[str]:
    return [
        (f"One llm-proxy ({DEFAULT.note}) serves four models: per load, one on an `openai` provider "
         "(pass-through) and one on an `anthropic` provider (converted both ways), on the same upstream "
         "process; `(N×)` is the converted figure over the pass-through's."),
        ("JSON: wrk, nginx answering a fixed `chat.completion` (614 B) or the same answer as an Anthropic "
         f"`message` on `/v1/messages`. Streams: {bench.params.stream_concurrency} concurrent, the SSE "
         "server's chunks or Anthropic's named events (message_start, content_block_start, text deltas, "
         "content_block_stop, message_delta with usage, message_stop); p50/p99 of a stream are to its end."),
        (f"Medians over {rounds} rounds (at least 2, also in quick mode), the order of the two paths "
         "alternating from round to round."),
        ("Targets (protocol-conversion issue): converted JSON ≤ 1.3× the pass-through's CPU per request, "
         "converted streams ≤ 1.5× per stream."),
        ("Before the load, one request on each path: the client got the upstream's text and usage, "
         "and every stream ended with [DONE]."),
    ]


def check_answers(hop: Hop, chunks: int) -> None:
    """One request of each case: every answer carries the upstream's text and usage (converted
    or not), every stream ends with [DONE]. RuntimeError otherwise: a load of errors measures
    nothing."""
    for case in cases():
        body = _post(hop.chat_url, chat_body(model=case.model, stream=case.load == "stream"))
        if case.load == "json":
            answer = orjson.loads(body)
            text, usage = answer["choices"][0]["message"]["content"], answer["usage"]
            want, tokens = ANSWER_TEXT, (PROMPT_TOKENS, COMPLETION_TOKENS)
        else:
            text, usage = _read_stream(body)
            want, tokens = "".join(f"tok{i} " for i in range(chunks)), (STREAM_PROMPT_TOKENS, chunks)
        if text != want or usage is None or (usage["prompt_tokens"], usage["completion_tokens"]) != tokens:
            raise RuntimeError(f"{case.load}, {case.path}: unexpected answer {body[:300]!r}")


def _read_stream(body: bytes) -> tuple[str, dict[str, Any] | None]:
    events = [event[6:] for event in body.split(b"\n\n") if event.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        raise RuntimeError(f"a stream without [DONE]: {body[-300:]!r}")
    chunks = [orjson.loads(event) for event in events[:-1]]
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    usage = next((chunk["usage"] for chunk in chunks if chunk.get("usage")), None)
    return text, usage


def _post(url: str, body: bytes) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, body, HEADERS), timeout=10) as response:
        data: bytes = response.read()
        return data
