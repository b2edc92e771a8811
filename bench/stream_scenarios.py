"""Streaming scenarios: (c) streams at concurrency 50, (d) many concurrent slow streams.

(c) compares direct-to-upstream, the floor and llm-proxy on the same SSE upstream: added time
to first byte, CPU per stream, and whether events still arrive one by one. (d) holds thousands
of slow streams in one gateway process: its RSS idle and at the peak, and that all complete.
"""

from __future__ import annotations

import resource
import time
from typing import Any

import uvloop

from proxy.edge import connection_cap

from .configs import DEFAULT, mock_provider, provider
from .harness import MIB, Bench, Hop, with_ratios
from .load import chat_body
from .streams import hold_streams, incremental, summarize

STREAM_KEYS = ("streams_per_s", "ttfb_p50_ms", "ttfb_p99_ms", "cpu_us")
OPENING = 256  # connections being opened at once in (d): the client opens them in batches


def streams(bench: Bench) -> dict[str, Any]:
    params = bench.params
    shapes = [(params.stream_chunks, 0), (params.stream_chunks, params.stream_gap_ms)]
    providers = {_model(*shape): provider(f"{bench.sse}/sse/{shape[0]}/{shape[1]}/v1") for shape in shapes}
    rows: list[dict[str, Any]] = []
    with bench.gateway("llm-proxy-streams", providers) as gateway:
        for chunks, gap_ms in shapes:
            rows += _shape_rows(bench, gateway, chunks, gap_ms)
    columns = [
        ["stream", "shape", "text", None], ["target", "target", "text", None],
        ["streams/s", "streams_per_s", "f0", "streams_per_s_x_floor"],
        ["TTFB p50 ms", "ttfb_p50_ms", "f2", "ttfb_p50_ms_x_floor"],
        ["TTFB p99 ms", "ttfb_p99_ms", "f2", "ttfb_p99_ms_x_floor"],
        ["added TTFB p50 / p99 ms vs direct", "ttfb_added", "text", None],
        ["total p50 ms", "total_p50_ms", "f1", None],
        ["CPU µs/stream", "cpu_us", "n0", "cpu_us_x_floor"],
        ["events/stream", "events_per_stream", "f1", None],
        ["inter-read gap p50 ms", "gap_p50_ms", "f1", None],
        ["incremental", "incremental", "text", None], ["errors", "errors_total", "n0", None],
    ]
    return {"id": "c", "title": f"(c) Streams, concurrency {params.stream_concurrency}",
            "columns": columns, "rows": rows,
            "notes": [f"llm-proxy config: {DEFAULT.note}.",
                      ("The client asks for `stream_options.include_usage`, so all three paths forward "
                       "the same bytes and relay the same events (the usage chunk included)."),
                      ("Incremental: events arrive in separate reads, their gaps within 0.7–1.5× of "
                       "the upstream's gap.")]}


def _model(chunks: int, gap_ms: int) -> str:
    return f"bench-stream-{chunks}x{gap_ms}ms"


def _shape_rows(bench: Bench, gateway: Hop, chunks: int, gap_ms: int) -> list[dict[str, Any]]:
    shape = f"{chunks} chunks × {gap_ms} ms" if gap_ms else f"{chunks} chunks, no gap"
    bench.log(f"(c) streams: {shape}")
    body = chat_body(model=_model(chunks, gap_ms), stream=True)
    upstream = f"{bench.sse}/sse/{chunks}/{gap_ms}"
    direct = bench.measure_streams(None, upstream + "/v1/chat/completions", body, "direct")
    with bench.floor(upstream) as hop:
        floor = bench.measure_streams(hop, hop.chat_url, body, "floor")
    proxy = with_ratios(bench.measure_streams(gateway, gateway.chat_url, body, "llm-proxy"), floor, STREAM_KEYS)
    rows = [{"target": "direct to SSE upstream", **direct}, {"target": "floor", **floor},
            {"target": "llm-proxy", **proxy}]
    for row in rows:
        row["shape"] = shape
        row["incremental"] = incremental(row, gap_ms)
        if row is not rows[0]:
            row["ttfb_added"] = _added(row, direct)
    return rows


def _added(row: dict[str, Any], direct: dict[str, Any]) -> str:
    try:
        return (f"{row['ttfb_p50_ms'] - direct['ttfb_p50_ms']:+.2f} / "
                f"{row['ttfb_p99_ms'] - direct['ttfb_p99_ms']:+.2f}")
    except TypeError:
        return "–"


def many_streams(bench: Bench) -> dict[str, Any]:
    """(d) `hold_count` slow streams at once in one gateway process.

    Through the SSE upstream a hop holds two sockets per stream. When the open-files limit does
    not allow that many, the full count goes through the mock provider (client sockets only),
    and as many as fit go through the SSE upstream, the floor first for comparison.
    """
    params = bench.params
    count, chunks, gap_ms = params.hold_count, params.hold_chunks, params.hold_gap_ms
    open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    fits = (open_files - 1024) // 2 // 1000 * 1000
    # the gateway takes at most (limit - 64) / 2 client connections (`edge.connection_cap`), one
    # upstream socket kept for each: past that a new connection is refused, so no more are sent
    capped = min(count, connection_cap())
    rows = []
    if fits < count:
        bench.log(f"(d) {capped} concurrent slow streams through the mock provider")
        with bench.gateway("llm-proxy-hold-mock", {"bench-slow": mock_provider(gap_ms)}) as hop:
            row = _hold(bench, hop, hop.chat_url, capped)
        rows.append({"target": "llm-proxy", "upstream": f"mock provider, {chunks} words, "
                     f"chunk_delay_ms {gap_ms}", **row})
    if fits >= 1000:
        rows += _hold_through_sse(bench, min(count, fits))
    notes = [f"llm-proxy config: {DEFAULT.note}.",
             (f"Open-files limit of every process: {open_files} (the soft limit raised to the hard one "
              f"by the harness); the client opens at most {OPENING} connections at a time."),
             ("KiB per open stream = (RSS when the most streams were open − idle RSS) / that many "
              "streams (sampled every 0.2 s).")]
    if fits < count:
        notes.append(f"{count:,} streams through an upstream need 2 × {count:,} sockets in a hop, over the "
                     "open-files limit: they go through the mock provider (one event per word, then the "
                     "usage chunk and [DONE], each chunk_delay_ms apart; no upstream sockets).")
    if capped < count:
        notes.append(f"The gateway takes at most (open-files limit − 64) ÷ 2 = {capped:,} client connections "
                     "(one upstream socket kept for each; the others are refused and counted in "
                     "llm_proxy_connections_refused_total): the mock provider's streams are that many.")
    return {"id": "d", "title": f"(d) {count:,} concurrent slow streams in one gateway process",
            "columns": HOLD_COLUMNS, "rows": rows, "notes": notes}


def _hold_through_sse(bench: Bench, count: int) -> list[dict[str, Any]]:
    chunks, gap_ms = bench.params.hold_chunks, bench.params.hold_gap_ms
    upstream = f"{bench.sse}/sse/{chunks}/{gap_ms}"
    shape = f"SSE upstream, {chunks} chunks × {gap_ms} ms"
    bench.log(f"(d) {count} concurrent slow streams through the {shape}: floor, then llm-proxy")
    with bench.floor(upstream) as hop:
        floor = {"target": "floor", "upstream": shape, **_hold(bench, hop, hop.chat_url, count)}
    with bench.gateway("llm-proxy-hold", {"bench-slow": provider(upstream + "/v1")}) as hop:
        row = {"target": "llm-proxy", "upstream": shape, **_hold(bench, hop, hop.chat_url, count)}
    return [floor, with_ratios(row, floor, ("rss_peak_mib", "kib_per_stream", "cpu_us"))]


HOLD_COLUMNS = [
    ["target", "target", "text", None], ["upstream", "upstream", "text", None],
    ["streams", "streams", "n0", None], ["complete", "complete", "n0", None],
    ["most open at once", "peak_open", "n0", None], ["RSS idle MiB", "rss_idle_mib", "f1", None],
    ["RSS peak MiB", "rss_peak_mib", "f1", "rss_peak_mib_x_floor"],
    ["KiB per open stream", "kib_per_stream", "f1", "kib_per_stream_x_floor"],
    ["CPU µs/stream", "cpu_us", "n0", "cpu_us_x_floor"], ["TTFB p50 / p99 ms", "ttfb", "text", None],
    ["total p50 ms", "total_p50_ms", "n0", None], ["wall s", "wall_s", "f1", None],
    ["errors", "errors", "text", None],
]


def _hold(bench: Bench, hop: Hop, url: str, count: int) -> dict[str, Any]:
    """Holds `count` slow streams through `hop`: its RSS idle and at the peak, CPU, completions."""
    chunks, gap_ms = bench.params.hold_chunks, bench.params.hold_gap_ms
    body = chat_body(model="bench-slow", stream=True, words=chunks)
    timeout_s = count / 200 + (chunks + 3) * gap_ms / 1000 + 60
    time.sleep(0.3)
    idle = hop.proc.rss_bytes()
    peak = {"rss": idle, "open": 0, "rss_at_open": idle}  # RSS when the most streams were open

    def tick(open_now: int) -> None:
        rss = hop.proc.rss_bytes()
        peak["rss"] = max(peak["rss"], rss)
        if open_now and open_now >= peak["open"]:
            peak.update(open=open_now, rss_at_open=rss)

    cpu_before = hop.proc.cpu_seconds()
    samples, peak_open, seconds = uvloop.run(
        hold_streams(url, body, count=count, opening=OPENING, timeout_s=timeout_s, on_tick=tick)
    )
    summary = summarize(samples, seconds)
    row = {
        **summary,
        "peak_open": peak_open,
        "rss_idle_mib": idle / MIB,
        "rss_peak_mib": peak["rss"] / MIB,
        "kib_per_stream": (peak["rss_at_open"] - idle) / 1024 / max(1, peak["open"]),
        "cpu_us": (hop.proc.cpu_seconds() - cpu_before) / max(1, count) * 1e6,
        "ttfb": f"{summary['ttfb_p50_ms'] or 0:.1f} / {summary['ttfb_p99_ms'] or 0:.1f}",
        "wall_s": seconds,
        "errors": ", ".join(f"{kind}: {n}" for kind, n in summary["errors"].items()) or "none",
    }
    bench.log(f"  {row['complete']}/{count} complete, most open at once {peak_open}, "
              f"RSS {row['rss_idle_mib']:.0f} → {row['rss_peak_mib']:.0f} MiB, {seconds:.1f} s")
    return row
