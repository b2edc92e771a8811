"""What the hop under test talks to, started on the load core: nginx, the SSE server, Redis.

nginx answers every request with one fixed ~600-byte `chat.completion` (`return 200`) from a
config generated here, and `/v1/messages` with the same answer as an Anthropic `message`, so the
JSON upstream costs next to nothing. Each start returns the base URL; the processes belong to
the caller's `Procs`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import orjson

from .procs import Cores, Proc, Procs, free_port, wait_listening

SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TOOLS = {"nginx": "nginx", "wrk": "wrk", "redis-server": "redis-server"}  # binary: Debian package

ANSWER_TEXT = (
    "Paris is the capital of France. It lies on the Seine in the north of the "
    "country and has been the seat of government since the tenth century. "
    "Its metropolitan area holds about twelve million people, and the city "
    "is known for its museums, its architecture and its cafes."
)
PROMPT_TOKENS, COMPLETION_TOKENS = 251, 58

CHAT_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench0000000000000000000001",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-chat",
        "system_fingerprint": "fp_bench00000",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": ANSWER_TEXT,
                    "refusal": None,
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": COMPLETION_TOKENS,
                  "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS},
    }
)

# The same answer as Anthropic's Messages API sends it (POST /v1/messages).
ANTHROPIC_MESSAGE = orjson.dumps(
    {
        "id": "msg_bench00000000000000000001",
        "type": "message",
        "role": "assistant",
        "model": "bench-anthropic",
        "content": [{"type": "text", "text": ANSWER_TEXT}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": PROMPT_TOKENS, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": COMPLETION_TOKENS},
    }
)

NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_max_body_size 64m;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
        location = /v1/messages {{
            default_type application/json;
            return 200 '{message}';
        }}
    }}
}}
"""


def find_tool(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def missing_tools() -> list[str]:
    return [name for name in TOOLS if find_tool(name) is None]


def _nginx_literal(body: bytes) -> str:
    text = body.decode()
    assert "'" not in text and "$" not in text and "\\" not in text  # nginx string literal
    return text


def start_nginx(procs: Procs, cores: Cores) -> str:
    port = free_port()
    conf = procs.workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=procs.workdir, port=port, body=_nginx_literal(CHAT_COMPLETION),
                                      message=_nginx_literal(ANTHROPIC_MESSAGE)))
    nginx = find_tool("nginx")
    assert nginx is not None
    argv = [nginx, "-p", str(procs.workdir), "-c", str(conf), "-e", str(procs.workdir / "nginx-error.log")]
    proc = procs.start("nginx", argv, cores=cores.load)
    wait_listening(proc, port)
    return f"http://127.0.0.1:{port}"


def start_sse(procs: Procs, cores: Cores) -> str:
    port = free_port()
    argv = [sys.executable, "-m", "bench.sse_server", "--port", str(port)]
    proc = procs.start("sse-upstream", argv, cores=cores.load)
    wait_listening(proc, port)
    return f"http://127.0.0.1:{port}"


def start_redis(procs: Procs, cores: Cores) -> tuple[str, Proc]:
    port = free_port()
    redis = find_tool("redis-server")
    assert redis is not None
    argv = [
        redis, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--dir", str(procs.workdir), "--daemonize", "no", "--logfile", "",
    ]
    proc = procs.start("redis", argv, cores=cores.load)
    wait_listening(proc, port)
    return f"redis://127.0.0.1:{port}/0", proc


def redis_commands(url: str) -> int:
    """Commands the Redis server has processed so far (to see whether the gateway uses it)."""
    import redis  # the gateway's own dependency

    client = redis.Redis.from_url(url)
    try:
        return int(client.info("stats")["total_commands_processed"])
    finally:
        client.close()


def tool_version(name: str) -> str:
    path = find_tool(name)
    if path is None:
        return "missing"
    flag = {"nginx": "-v", "wrk": "-v", "redis-server": "--version"}[name]
    done = subprocess.run([path, flag], check=False, capture_output=True, text=True, timeout=10)
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"

