"""The `llm-proxy` command: serve, check-config, hash-key.

Parses arguments and config and hands over to `server`; a config error exits 2 before any
port is bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys

from .config import Config, ConfigError
from .configfile import load_config
from .supervisor import WORKER_ENV, supervise

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "hash-key":
        print(hashlib.sha256(args.key.encode()).hexdigest())
        return 0
    if args.command == "check-config":
        return _check_config(args.file)
    return _serve(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="OpenAI-compatible LLM gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="config file (default: $LLM_PROXY_CONFIG)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("file")
    hash_key = commands.add_parser("hash-key", help="print the SHA-256 of a gateway key")
    hash_key.add_argument("key")
    return parser


def _check_config(path: str) -> int:
    try:
        load_config(path)
    except ConfigError as exc:
        _report(path, exc)
        return EXIT_CONFIG
    print(f"{path}: ok")
    return 0


def _serve(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("LLM_PROXY_CONFIG")
    if not path:
        print("llm-proxy: no config: pass --config FILE or set LLM_PROXY_CONFIG", file=sys.stderr)
        return EXIT_CONFIG
    try:
        file_config = load_config(path)
        config = _with_overrides(file_config, args)
    except ConfigError as exc:
        _report(path, exc)
        return EXIT_CONFIG
    worker_of = os.environ.get(WORKER_ENV)
    if worker_of is None and config.server.workers > 1:
        if config.server.port == 0:
            print("llm-proxy: workers > 1 need a fixed port, not 0", file=sys.stderr)
            return EXIT_CONFIG
        return supervise(config, path=path)
    from .server import serve  # imported late: check-config and hash-key need no event loop

    return serve(config, path=path, file_config=file_config, workers=int(worker_of or 1))


def _with_overrides(config: Config, args: argparse.Namespace) -> Config:
    changes = {
        name: value
        for name, value in (("host", args.host), ("port", args.port), ("workers", args.workers))
        if value is not None
    }
    problems = []
    if "port" in changes and not 0 <= changes["port"] <= 65535:
        problems.append("--port: must be between 0 and 65535")
    if "workers" in changes and changes["workers"] < 1:
        problems.append("--workers: must be at least 1")
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **changes))


def _report(path: str, error: ConfigError) -> None:
    print(f"{path}: {len(error.problems)} problem(s)", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
