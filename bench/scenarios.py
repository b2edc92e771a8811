"""Non-streaming scenarios: (a) the headline hop, (b) the cost ladder, (e) body sizes, (f) workers.

(a) and (b) are measured together in interleaved rounds (direct, floor, llm-proxy defaults,
then each ladder step), so slow drift of the machine hits every configuration alike; their
figures are medians over the rounds. Each scenario returns a table: `columns` are (header, key,
format, ratio key or None) and `rows` hold raw numbers, formatted only by the report.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from .configs import DEFAULT, LADDER, Step, gateway_config, provider, with_rpm
from .harness import Bench, median_row, with_ratios
from .load import GATEWAY_KEY, chat_body, write_lua
from .procs import ProcError

CHAT_MODEL = "bench-chat"
FLOOR_HTTP1 = "floor, llm-proxy's HTTP client"
RATIO_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us")
HOP_COLUMNS = [
    ["req/s", "rps", "n0", "rps_x_floor"],
    ["p50 ms", "p50_ms", "f2", "p50_ms_x_floor"],
    ["p99 ms", "p99_ms", "f2", "p99_ms_x_floor"],
    ["CPU µs/req", "cpu_us", "n0", "cpu_us_x_floor"],
]


def _range_column(bench: Bench) -> list[list[Any]]:
    return [["CPU µs/req over rounds", "cpu_us_range", "text", None]] if bench.params.rounds > 1 else []


def chat_providers(bench: Bench, accounts: int = 1) -> dict[str, Any]:
    return {CHAT_MODEL: provider(bench.nginx + "/v1", accounts)}


def hop_rounds(bench: Bench) -> dict[str, list[dict[str, Any]]]:
    """Every configuration of (a) and (b), measured `rounds` times: name -> one row per round."""
    script = write_lua(bench.workdir, chat_body(model=CHAT_MODEL), "chat-1k")
    rounds: dict[str, list[dict[str, Any]]] = defaultdict(list)
    total = bench.params.rounds
    for number in range(1, total + 1):
        bench.log(f"(a)+(b) non-streaming, {bench.params.connections} connections: round {number}/{total}")
        rounds["direct"].append(bench.measure(None, bench.nginx + "/v1/chat/completions", script, "direct"))
        with bench.floor(bench.nginx) as hop:
            rounds["floor"].append(bench.measure(hop, hop.chat_url, script, "floor"))
        with bench.floor(bench.nginx, client="http1") as hop:
            rounds[FLOOR_HTTP1].append(bench.measure(hop, hop.chat_url, script, FLOOR_HTTP1))
        for step in (DEFAULT, *LADDER):
            rounds[step.name].append(_measure_step(bench, step, script))
    return dict(rounds)


def _measure_step(bench: Bench, step: Step, script: Path) -> dict[str, Any]:
    name = "llm-proxy-" + "".join(c if c.isalnum() else "-" for c in step.name).strip("-")
    with bench.gateway(name, chat_providers(bench, step.accounts), step=step) as hop:
        idle = hop.proc.rss_bytes() / 2**20
        return {"rss_idle_mib": idle, **bench.measure(hop, hop.chat_url, script, step.name, redis=step.redis)}


def non_streaming(bench: Bench, rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """(a) direct to nginx, the floor and llm-proxy with its default config, 50 connections."""
    floor = median_row(rounds["floor"])
    mine = median_row(rounds[DEFAULT.name])
    floor_http1 = median_row(rounds[FLOOR_HTTP1])
    rows = [{"target": "direct to nginx", **median_row(rounds["direct"])},
            {"target": "floor (bench/floor.py)", **floor},
            with_ratios({"target": f"{FLOOR_HTTP1} (bench/floor.py --client http1)", **floor_http1},
                        floor, RATIO_KEYS),
            with_ratios({"target": "llm-proxy", **mine}, floor, RATIO_KEYS)]
    return {
        "id": "a",
        "title": f"(a) Non-streaming, {bench.params.connections} connections, ~1 KB body",
        "columns": [["target", "target", "text", None], *HOP_COLUMNS, *_range_column(bench),
                    ["errors", "errors", "n0", None], ["RSS idle MiB", "rss_idle_mib", "f1", None],
                    ["RSS after load MiB", "rss_mib", "f1", None]],
        "rows": rows,
        "rounds": rounds,
        "notes": [f"llm-proxy config: {DEFAULT.note}.",
                  (f"The floor forwards with aiohttp's client, llm-proxy with its own (`proxy/http1.py`). "
                   f"Over the floor with that same client, llm-proxy's defaults take "
                   f"{_ratio(mine, floor_http1)} the CPU per request."),
                  f"Medians over {bench.params.rounds} interleaved round(s) with the ladder (b).",
                  ("Direct to nginx: wrk and nginx share the load core, so it is a ceiling of the "
                   "load side, not of the hop.")],
    }


def ladder(bench: Bench, rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """(b) each step adds one feature on top of the one before."""
    floor = median_row(rounds["floor"])
    rows = [{"step": "bare hop (floor)", "config": "bench/floor.py", **floor}]
    for step in LADDER:
        row = median_row(rounds[step.name])
        row["cpu_us_delta"] = row["cpu_us"] - rows[-1]["cpu_us"]
        rows.append(with_ratios({"step": step.name, "config": step.note, **row}, floor, RATIO_KEYS))
    columns = [["step", "step", "text", None], *HOP_COLUMNS, *_range_column(bench),
               ["Δ CPU µs vs previous step", "cpu_us_delta", "delta", None],
               ["Redis commands/req", "redis_per_req", "f2", None],
               ["redis-server CPU µs/req", "redis_cpu_us", "n0", None], ["config", "config", "text", None]]
    return {"id": "b", "title": f"(b) Cost ladder, {bench.params.connections} connections, ~1 KB body",
            "columns": columns, "rows": rows,
            "notes": _limits_notes(bench, rows, median_row(rounds[FLOOR_HTTP1]))}


def _ratio(row: dict[str, Any], base: dict[str, Any]) -> str:
    mine, theirs = row.get("cpu_us"), base.get("cpu_us")
    return f"{mine / theirs:.2f}×" if isinstance(mine, (int, float)) and theirs else "n/a"


def _limits_notes(
    bench: Bench, rows: list[dict[str, Any]], floor_http1: dict[str, Any]
) -> list[str]:
    notes = [f"Medians over {bench.params.rounds} interleaved round(s); the floor is (a)'s.",
             (f"Over the floor with llm-proxy's own HTTP client ((a), {floor_http1.get('cpu_us', 0):,.0f} "
              f"µs/req), the last step (every feature on) takes {_ratio(rows[-1], floor_http1)} the CPU "
              f"per request.")]
    allowed, sent = limits_probe(bench)
    if allowed == sent:
        notes.append(f"Key limits are not enforced by this build (with `limits: {{rpm: 2}}`, {allowed} of "
                     f"{sent} requests passed): the limits steps only carry the config, so they cannot "
                     "differ from the step before but by noise.")
    else:
        notes.append(f"Key limits are enforced (with `limits: {{rpm: 2}}`, {allowed} of {sent} requests passed).")
    if not any(row.get("redis_per_req") for row in rows):
        notes.append("The gateway sent no command to Redis during the Redis steps: `redis.url` is not used yet.")
    return notes


def limits_probe(bench: Bench, sent: int = 6) -> tuple[int, int]:
    """Requests that passed a key limit of 2 per minute: `sent` when limits are not enforced."""
    config = with_rpm(gateway_config(port=0, providers=chat_providers(bench)), rpm=2)
    with bench.gateway("llm-proxy-limits-probe", {}, config=config) as hop:
        return sum(_post_ok(hop.chat_url, chat_body(model=CHAT_MODEL)) for _ in range(sent)), sent


def _post_ok(url: str, body: bytes) -> bool:
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=5) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


def body_sizes(bench: Bench) -> dict[str, Any]:
    """(e) CPU per request as the body grows: llm-proxy (defaults) against the floor, back to back."""
    bench.log("(e) body sizes")
    rows = []
    with bench.floor(bench.nginx) as floor_hop, bench.gateway("llm-proxy-bodies", chat_providers(bench)) as hop:
        for size in bench.params.body_sizes:
            script = write_lua(bench.workdir, chat_body(model=CHAT_MODEL, size=size), f"chat-{size}")
            floor = bench.measure(floor_hop, floor_hop.chat_url, script, f"floor {_size(size)}")
            row = with_ratios(bench.measure(hop, hop.chat_url, script, f"llm-proxy {_size(size)}"), floor, RATIO_KEYS)
            rows.append({"body": _size(size), "floor_cpu_us": floor["cpu_us"], "floor_rps": floor["rps"],
                         "floor_core_other_pct": floor.get("core_other_pct"), **row})
    columns = [["body", "body", "text", None], ["floor CPU µs/req", "floor_cpu_us", "n0", None],
               ["llm-proxy CPU µs/req", "cpu_us", "n0", "cpu_us_x_floor"],
               ["floor req/s", "floor_rps", "n0", None], ["llm-proxy req/s", "rps", "n0", "rps_x_floor"],
               ["llm-proxy p99 ms", "p99_ms", "f2", "p99_ms_x_floor"], ["errors", "errors", "n0", None]]
    return {"id": "e", "title": f"(e) Body size, {bench.params.connections} connections", "columns": columns,
            "rows": rows, "notes": [f"llm-proxy config: {DEFAULT.note}.",
                                    "For each size the floor, then llm-proxy, one measurement each."]}


def _size(size: int) -> str:
    return f"{size // 1048576} MB" if size >= 1048576 else f"{size // 1024} KB"


def workers(bench: Bench) -> dict[str, Any]:
    """(f) `serve --workers 2` against 1 worker, back to back; skipped while serve refuses it."""
    bench.log("(f) --workers 2 vs 1")
    script = write_lua(bench.workdir, chat_body(model=CHAT_MODEL), "chat-1k")
    table: dict[str, Any] = {"id": "f", "title": "(f) --workers 2 vs 1", "columns": [
        ["workers", "workers", "text", None], *HOP_COLUMNS, ["errors", "errors", "n0", None]],
        "rows": [], "notes": []}
    rows = []
    for count in (1, 2):
        config = gateway_config(port=0, providers=chat_providers(bench))
        try:
            with bench.gateway(f"llm-proxy-workers{count}", {}, config=config, workers=count) as hop:
                rows.append({"workers": str(count), **bench.measure(hop, hop.chat_url, script, f"{count} worker(s)")})
        except ProcError as exc:
            code = exc.proc.popen.returncode if exc.proc is not None else None
            reason = "skipped: workers not supported yet" if code == 2 else f"failed to start: {exc}"
            bench.log(f"  {reason}")
            table["skipped"] = reason
            table["notes"].append(f"{reason} (`serve --workers {count}` exited {code}).")
            return table
    table["rows"] = [rows[0], with_ratios(rows[1], rows[0], RATIO_KEYS)]
    where = (f"cores {bench.cores.workers()}" if bench.cores.spare else
             f"core {bench.cores.gateway} with the one worker's core: this machine has no third core, so "
             "the figure shows what a second process costs, not what it gains")
    table["notes"] += [f"Ratios of the 2-worker row are to 1 worker (not to the floor). 2 workers run on {where}.",
                       "CPU covers the whole process tree (supervisor and workers)."]
    return table
