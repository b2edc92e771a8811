"""The results of a run as a markdown table and JSON in `bench/results/`.

Writes timestamped files plus `latest.md` / `latest.json`; knows nothing of how the figures
were measured, only how each column is formatted.
"""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

from .upstreams import tool_version

RESULTS = Path(__file__).resolve().parent / "results"
NOISY_PCT = 10  # other processes' share of the gateway core that marks a measurement as noisy
NOISY_NOTE = (f"† other processes used more than {NOISY_PCT}% of the gateway core during this "
              "measurement (`core_other_pct` in the JSON): treat it as noisy.")


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found[1].strip() if found else model
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": tool_version("nginx"),
        "wrk": tool_version("wrk"),
        "redis": tool_version("redis-server"),
    }


def _cell(value: Any, kind: str) -> str:
    if value is None or value == "":
        return "–"
    if kind == "text" or not isinstance(value, (int, float)):
        return str(value)
    if kind == "n0":
        return f"{value:,.0f}"
    if kind == "delta":
        return f"{value:+,.0f}"
    digits = int(kind[1:]) if kind[1:].isdigit() else 1
    return f"{value:,.{digits}f}"


def table(result: dict[str, Any]) -> list[str]:
    columns = result["columns"]
    lines = ["| " + " | ".join(column[0] for column in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in result["rows"]:
        cells = []
        for _, key, kind, ratio_key in columns:
            cell = _cell(row.get(key), kind)
            ratio = row.get(ratio_key) if ratio_key else None
            cells.append(f"{cell} ({ratio:.2f}×)" if isinstance(ratio, float) else cell)
        if _noisy(row):
            cells[0] += " †"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _noisy(row: dict[str, Any]) -> bool:
    return (row.get("core_other_pct") or 0) > NOISY_PCT


def markdown(run: dict[str, Any]) -> str:
    info = run["machine"]
    lines = [
        f"## Results: {run['mode']} run, {run['started']}",
        "",
        (f"Machine: {info['nproc']} CPUs ({info['cpu']}), kernel {info['kernel']}, "
         f"Python {info['python']}; {info['nginx']}, {info['wrk']}, {info['redis']}."),
        "",
        f"Pinning: {run['pinning']}.",
        "",
        f"Each load: {run['settings']}. Total run time {run['seconds']:.0f} s.",
        ("Figures of llm-proxy carry their ratio to the floor measured in the same run, as `(N×)` "
         "(in (f) to 1 worker, in (g) to the pass-through)."),
    ]
    for result in run["scenarios"]:
        lines += ["", f"### {result['title']}", ""]
        if result.get("skipped"):
            lines.append(f"{result['skipped']}.")
        elif result.get("failed"):
            lines.append(f"Failed: {result['failed']}")
        else:
            lines += table(result)
        notes = result.get("notes", []) + ([NOISY_NOTE] if any(map(_noisy, result.get("rows", []))) else [])
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write(run: dict[str, Any], directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = run["started"].replace(":", "").replace("-", "").replace("T", "-")[:15]
    text = markdown(run)
    data = json.dumps(run, indent=2, default=str) + "\n"
    for name, content in ((f"{stamp}-{run['mode']}.md", text), ("latest.md", text),
                          (f"{stamp}-{run['mode']}.json", data), ("latest.json", data)):
        (directory / name).write_text(content)
    return directory / f"{stamp}-{run['mode']}.md"
