"""Non-streaming load: realistic chat bodies and `wrk` with a Lua script that POSTs one.

`run_wrk` runs wrk on the load core and reads its summary (`--latency` gives the percentiles).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from .procs import Cores
from .upstreams import find_tool

GATEWAY_KEY = "sk-bench"
FILLER = (
    "The quarterly report lists revenue by region, the cost of each product line and the "
    "changes in headcount, and asks which of the three markets grew fastest after tax. "
)

LUA = """\
local file = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
"""


def chat_body(*, model: str, size: int = 1024, stream: bool = False, words: int = 12) -> bytes:
    """A chat request like real clients send, padded to about `size` bytes.

    The last user message has `words` words: the mock provider streams one chunk per word.
    Streams ask for `include_usage`, so every path (direct, floor, llm-proxy) forwards the same
    bytes and gets the same events back.
    """
    data: dict[str, object] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a careful analyst. Answer in short paragraphs."},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": "Which figures should I compare first?"},
            {"role": "user", "content": " ".join(f"word{i}" for i in range(words))},
        ],
        "temperature": 0.7,
        "max_tokens": 256,
    }
    if stream:
        data["stream"] = True
        data["stream_options"] = {"include_usage": True}
    missing = max(0, size - len(orjson.dumps(data)))
    filler = (FILLER * (missing // len(FILLER) + 1))[:missing]
    data["messages"][1]["content"] = filler  # type: ignore[index]
    return orjson.dumps(data)


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors (connect, read, write, timeout) plus non-2xx answers

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def write_lua(workdir: Path, body: bytes, name: str) -> Path:
    body_path = workdir / f"{name}.json"
    body_path.write_bytes(body)
    script = workdir / f"{name}.lua"
    script.write_text(LUA.format(body=body_path, key=GATEWAY_KEY))
    return script


def run_wrk(url: str, script: Path, *, connections: int, seconds: float, cores: Cores) -> WrkResult:
    wrk = find_tool("wrk")
    assert wrk is not None
    command = [
        wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
        "--timeout", "10s", "-s", str(script), url,
    ]
    if cores.load is not None:
        command = ["taskset", "-c", cores.load, *command]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


_DURATION = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unreadable wrk duration {text!r}")
    return float(match[1]) * _DURATION[match[2]]


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, output, re.MULTILINE)

    total = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
    p50, p99, rps = find(r"^\s*50%\s+(\S+)"), find(r"^\s*99%\s+(\S+)"), find(r"^Requests/sec:\s+([\d.]+)")
    if not (total and p50 and p99 and rps):
        raise RuntimeError(f"unreadable wrk output:\n{output}")
    sockets = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    non_2xx = find(r"Non-2xx or 3xx responses: (\d+)")
    errors = sum(int(n) for n in sockets.groups()) if sockets else 0
    return WrkResult(
        requests=int(total[1]),
        seconds=_ms(total[2] + total[3]) / 1000,
        rps=float(rps[1]),
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        errors=errors + (int(non_2xx[1]) if non_2xx else 0),
    )
