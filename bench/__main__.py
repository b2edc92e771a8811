"""`python -m bench [--quick] [--only a,c]`: llm-proxy against the floor and direct, in one run.

Checks for nginx, wrk and redis-server (installs nothing: `bench/run` does), pins the hop under
test and the load to different cores, runs the scenarios under a time limit, stops every
process it started, and writes the tables to `bench/results/`. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import conversion, messages, report, scenarios, stream_scenarios
from .harness import FULL, QUICK, Bench, Params
from .procs import Cores, Procs, raise_open_files
from .upstreams import TOOLS, missing_tools

Shared = dict[str, Any]  # what one scenario measured for another
Scenario = Callable[[Bench, Shared], dict[str, Any]]


class TimeLimit(BaseException):
    """The run went past its time limit (a BaseException: no scenario may catch it)."""


def _rounds(bench: Bench, shared: Shared) -> dict[str, list[dict[str, Any]]]:
    """The rounds (a) and (b) share, measured once; a failure is reported by both, not retried."""
    if "rounds_failed" in shared:
        raise RuntimeError(f"the rounds shared with (a) failed: {shared['rounds_failed']}")
    if "rounds" not in shared:
        try:
            shared["rounds"] = scenarios.hop_rounds(bench)
        except Exception as exc:
            shared["rounds_failed"] = exc
            raise
    rounds: dict[str, list[dict[str, Any]]] = shared["rounds"]
    return rounds


SCENARIOS: dict[str, Scenario] = {
    "a": lambda bench, shared: scenarios.non_streaming(bench, _rounds(bench, shared)),
    "b": lambda bench, shared: scenarios.ladder(bench, _rounds(bench, shared)),
    "c": lambda bench, shared: stream_scenarios.streams(bench),
    "d": lambda bench, shared: stream_scenarios.many_streams(bench),
    "e": lambda bench, shared: scenarios.body_sizes(bench),
    "f": lambda bench, shared: scenarios.workers(bench),
    "g": lambda bench, shared: conversion.converted(bench),
    "h": lambda bench, shared: messages.messages(bench),
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = missing_tools()
    if missing:
        packages = " ".join(TOOLS[name] for name in missing)
        print(f"bench: missing {', '.join(missing)}. Install with:\n  sudo apt-get install -y {packages}\n"
              "or run bench/run, which installs them and then runs the benchmarks.", file=sys.stderr)
        return 2
    params = QUICK if args.quick else FULL
    chosen = sorted(set(args.only.split(","))) if args.only else list(SCENARIOS)
    unknown = [key for key in chosen if key not in SCENARIOS]
    if unknown:
        print(f"bench: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    run = _run(params, chosen, keep=args.keep)
    path = report.write(run)
    print(report.markdown(run))
    print(f"bench: written {path} and {path.parent / 'latest.md'} (+ .json)", file=sys.stderr)
    return 1 if run.get("stopped") or any(s.get("failed") for s in run["scenarios"]) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs, 1,000 slow streams (about 2 min)")
    parser.add_argument("--only", help="comma-separated scenarios to run, e.g. a,c (a and b are measured together)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    return parser


def _run(params: Params, chosen: list[str], *, keep: bool) -> dict[str, Any]:
    cores = Cores.detect()
    if cores.load is not None:
        os.sched_setaffinity(0, {int(cores.load)})  # the SSE client runs in this process
    raise_open_files()
    workdir = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    started = time.monotonic()
    run: dict[str, Any] = {
        "mode": params.mode,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": report.machine(),
        "pinning": cores.describe(),
        "settings": _settings(params),
        "params": params.__dict__,
        "scenarios": [],
    }
    _arm_time_limit(params.time_limit_s)
    try:
        with Procs(workdir) as procs:
            bench = Bench(procs, params, cores)
            bench.log(f"{params.mode} run; work directory {workdir}; {cores.describe()}")
            bench.start_upstreams()
            _scenarios(bench, chosen, run["scenarios"])
    except TimeLimit:
        run["stopped"] = f"stopped at the time limit of {params.time_limit_s:g} s"
        print(f"bench: {run['stopped']}", file=sys.stderr)
    finally:
        signal.alarm(0)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    run["seconds"] = time.monotonic() - started
    return run


def _scenarios(bench: Bench, chosen: list[str], results: list[dict[str, Any]]) -> None:
    """Runs each chosen scenario, appending its table to `results` as soon as it has one."""
    shared: Shared = {}
    for key in chosen:
        try:
            results.append(SCENARIOS[key](bench, shared))
        except Exception as exc:  # noqa: BLE001 -- one broken scenario must not lose the others' figures
            bench.log(f"({key}) failed: {type(exc).__name__}: {exc}")
            results.append({"id": key, "title": f"({key})", "failed": f"{type(exc).__name__}: {exc}"})


def _settings(params: Params) -> str:
    return (f"{params.warmup_s:g} s warm-up then {params.seconds:g} s measured, {params.connections} "
            f"connections (wrk -t1) or {params.stream_concurrency} concurrent streams; "
            f"CPU = utime+stime of the hop's process tree from /proc, before/after the measured load")


def _arm_time_limit(seconds: float) -> None:
    def expire(signum: int, frame: object) -> None:
        raise TimeLimit()

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(143)  # unwinds through the finally blocks that stop every process

    signal.signal(signal.SIGALRM, expire)
    signal.signal(signal.SIGTERM, terminate)
    signal.alarm(int(seconds))


if __name__ == "__main__":
    sys.exit(main())
