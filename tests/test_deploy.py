"""Deployment, proven on loopback: two real gateways sharing a real Redis behind a real haproxy,
under load while they are restarted (SIGTERM drain) and reloaded (SIGHUP); and the checks of the
deploy/ files that need no Docker engine (Kubernetes schemas, haproxy -c, cross-file agreement).
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio
import yaml

from .processes import free_port, wait_ok, wait_ready
from .redisproc import RedisProcess

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
KEY = "sk-deploy-test"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WORDS = "one two three four five six seven eight"
CLIENTS = 20

GATEWAY_CONFIG = """
server:
  host: 127.0.0.1
  port: {port}
  drain_delay_s: {drain_delay_s}
  shutdown_grace_s: 5
redis:
  url: {redis_url}
  timeout_ms: 200
keys:
  - name: load
    key: {key}
    limits: {{rpm: 1000000, concurrency: 1000}}
providers:
  mock:
    type: mock
    chunk_delay_ms: 25
models:
  demo-chat:
    targets: [{{provider: mock}}]
"""

# The same retry and check policy as deploy/haproxy.cfg, on loopback ports and faster checks.
HAPROXY_CONFIG = """
global
    tune.bufsize 65536
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 5s
    timeout check 1s
frontend gateway
    bind 127.0.0.1:{port}
    default_backend gateways
backend gateways
    balance leastconn
    option http-buffer-request
    option httpchk GET /readyz
    http-check expect status 200
    retry-on conn-failure empty-response 503
    retries 3
    option redispatch 1
    default-server check inter 200ms fall 2 rise 2
    server r1 127.0.0.1:{port1}
    server r2 127.0.0.1:{port2}
listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


def require_haproxy() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.fail("haproxy is not installed: `apt-get install -y haproxy` (scripts/test installs it)")
    return binary


class Replica:
    """One `llm-proxy serve` on a fixed port; each start is a new process with its own log."""

    def __init__(self, *, name: str, port: int, config: Path, logs: Path) -> None:
        self.name = name
        self.port = port
        self.config = config
        self.logs = logs
        self.url = f"http://127.0.0.1:{port}"
        self.proc: asyncio.subprocess.Process | None = None
        self.generations = 0

    @property
    def stdout(self) -> Path:
        return self.logs / f"{self.name}-{self.generations}.out"

    @property
    def stderr(self) -> Path:
        return self.logs / f"{self.name}-{self.generations}.err"

    async def start(self) -> None:
        self.generations += 1
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                str(BIN / "llm-proxy"), "serve", "--config", str(self.config), stdout=out, stderr=err
            )
        await wait_ready(self.url)

    async def stop(self) -> int:
        """SIGTERM by PID, then the exit code once the drain is over."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                return await self.proc.wait()
        except TimeoutError:
            log = self.stderr.read_text()[-2000:]
            raise AssertionError(f"{self.name} still running 15 s after SIGTERM (drain + grace < 7 s):\n{log}") from None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


@dataclass
class Stack:
    url: str
    stats_url: str
    redis_url: str
    replicas: list[Replica]

    async def backend(self) -> dict[str, dict[str, str]]:
        """haproxy's stats rows of the backend, by server name (and BACKEND for the total)."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.stats_url};csv") as response:
            text = (await response.text()).lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "gateways"}

    async def wait_up(self, *names: str) -> None:
        async with asyncio.timeout(10):
            while True:
                rows = await self.backend()
                if all(rows[name]["status"] == "UP" for name in names):
                    return
                await asyncio.sleep(0.05)


@pytest.fixture
def drain_delay_s() -> float:
    """Longer than haproxy needs to notice /readyz (2 checks 200 ms apart), as deploy/ sets it."""
    return 1.0


@pytest.fixture
async def stack(tmp_path: Path, redis_server: RedisProcess, drain_delay_s: float) -> AsyncIterator[Stack]:  # noqa: F811
    haproxy = require_haproxy()
    ports = [free_port(), free_port()]
    replicas = []
    for index, port in enumerate(ports, start=1):
        config = tmp_path / f"r{index}.yaml"
        config.write_text(GATEWAY_CONFIG.format(port=port, redis_url=redis_server.url, key=KEY, drain_delay_s=drain_delay_s))
        replicas.append(Replica(name=f"r{index}", port=port, config=config, logs=tmp_path))
    port, stats_port = free_port(), free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG.format(port=port, port1=ports[0], port2=ports[1], stats_port=stats_port))
    proxy: asyncio.subprocess.Process | None = None
    try:
        await asyncio.gather(*(replica.start() for replica in replicas))
        with (tmp_path / "haproxy.log").open("wb") as log:
            proxy = await asyncio.create_subprocess_exec(haproxy, "-f", str(cfg), "-db", stdout=log, stderr=log)
        stack = Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}/stats", redis_server.url, replicas)
        await wait_ok(stack.stats_url)
        await stack.wait_up("r1", "r2")
        yield stack
    finally:
        if proxy is not None and proxy.returncode is None:
            os.kill(proxy.pid, signal.SIGKILL)
            await proxy.wait()
        for replica in replicas:
            await replica.kill()


@dataclass
class Load:
    sent: int = 0
    failed: int = 0
    streams: int = 0
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    duration_s: float = 0.0

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 10:
            self.failures.append(what)

    def report(self, title: str) -> str:
        return (f"{title}: {self.sent} requests ({self.streams} streamed) by {CLIENTS} clients in "
                f"{self.duration_s:.1f} s, {self.failed} failed")


async def run_load(url: str, stop: asyncio.Event) -> Load:
    """CLIENTS concurrent clients, alternating JSON and streaming, until `stop`; each answer checked."""
    load = Load()
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=CLIENTS)) as http:
        await asyncio.gather(*(client(http, url, load, stop, index) for index in range(CLIENTS)))
    load.duration_s = time.monotonic() - load.started
    return load


async def client(http: aiohttp.ClientSession, url: str, load: Load, stop: asyncio.Event, index: int) -> None:
    stream = index % 2 == 0
    while not stop.is_set():
        load.sent += 1
        load.streams += stream
        body = {"model": "demo-chat", "stream": stream, "messages": [{"role": "user", "content": WORDS}]}
        try:
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS) as response:
                problem = answer_problem(response.status, await response.read(), stream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = repr(exc)
        if problem:
            load.fail(problem)
        stream = not stream


def answer_problem(status: int, body: bytes, stream: bool) -> str | None:
    """What is wrong with a gateway answer, or None when it is a complete, correct one."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    if stream:
        complete = body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
        return None if complete else f"incomplete stream: {body[-200:]!r}"
    content = orjson.loads(body)["choices"][0]["message"]["content"]
    return None if content == WORDS else f"wrong content {content!r}"


def count_503s(replica: Replica) -> int:
    """503 answers in every generation's access log (haproxy retried each on the other replica)."""
    lines = [line for n in range(1, replica.generations + 1)
             for line in (replica.logs / f"{replica.name}-{n}.out").read_bytes().splitlines()]
    return sum(orjson.loads(line)["status"] == 503 for line in lines)


# 1 s: haproxy takes the replica out before it refuses anything. 0 s: the replica refuses new
# requests (503 `draining`, then closed connections) before haproxy notices, and haproxy's
# retries on the other replica are what keeps the clients whole.
@pytest.mark.parametrize("drain_delay_s", [1.0, 0.0], ids=["drain-1s", "drain-0s"])
async def test_rolling_sigterm_restart_under_load_loses_no_request(stack: Stack, drain_delay_s: float) -> None:
    stop = asyncio.Event()
    load_task = asyncio.create_task(run_load(stack.url, stop))
    await asyncio.sleep(1.0)
    for replica in stack.replicas:
        began = time.monotonic()
        assert await replica.stop() == 0
        drained_s = time.monotonic() - began
        await replica.start()  # a new process on the same port
        await stack.wait_up(replica.name)
        print(f"\n{replica.name}: drained and exited in {drained_s:.2f} s, back in rotation after "
              f"{time.monotonic() - began:.2f} s")
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)
    stop.set()
    load = await load_task
    backend = (await stack.backend())["BACKEND"]
    absorbed = sum(count_503s(replica) for replica in stack.replicas)
    print(f"{load.report(f'rolling restart, drain_delay_s {drain_delay_s:g}')}; haproxy retries "
          f"{backend['wretr']}, redispatches {backend['wredis']}; 503 answers retried: {absorbed}")
    assert load.failed == 0, load.failures
    assert load.sent > 200, "the load ran"
    if drain_delay_s == 0:
        assert int(backend["wretr"]) + int(backend["wredis"]) > 0, "haproxy's retries were exercised"
    client = redis.asyncio.from_url(stack.redis_url)
    try:
        assert await client.dbsize() > 0, "the replicas keep their shared state in Redis"
    finally:
        await client.aclose()


async def test_sighup_reload_under_load_loses_no_request_and_applies(stack: Stack) -> None:
    stop = asyncio.Event()
    load_task = asyncio.create_task(run_load(stack.url, stop))
    await asyncio.sleep(2.0)
    began = time.monotonic()
    for replica in stack.replicas:
        changed = replica.config.read_text() + "  added-model:\n    targets: [{provider: mock}]\n"
        replace_file(replica.config, changed)
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGHUP)
    async with aiohttp.ClientSession() as http:
        for url in [replica.url for replica in stack.replicas] + [stack.url] * 10:
            await wait_status(http, url, "added-model", 200)
    applied_s = time.monotonic() - began
    await asyncio.sleep(4.0 - applied_s)
    stop.set()
    load = await load_task
    print(f"\n{load.report('SIGHUP reload')}; new model served by both replicas after {applied_s:.2f} s")
    assert load.failed == 0, load.failures
    assert load.sent > 200, "the load ran"
    assert all(replica.proc is not None and replica.proc.returncode is None for replica in stack.replicas)


def replace_file(path: Path, text: str) -> None:
    """Writes a whole new file in one step, as an operator's tooling should."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


async def wait_status(http: aiohttp.ClientSession, url: str, model: str, want: int) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with asyncio.timeout(10):
        while True:
            async with http.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS) as response:
                await response.read()
                if response.status == want:
                    return
            await asyncio.sleep(0.05)


def kubernetes_validate() -> Path:
    """The validator's command, installed into this venv when missing; skips if that fails."""
    command = BIN / "kubernetes-validate"
    if not command.exists():
        install = subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "kubernetes-validate"],
            capture_output=True, text=True, timeout=45, check=False,
        )
        if install.returncode != 0 or not command.exists():
            pytest.skip(f"kubernetes-validate cannot be installed: {install.stderr[-500:]}")
    return command


def test_checks_k8s_manifests_validate_strictly() -> None:
    manifests = sorted(str(path) for path in (DEPLOY / "k8s").glob("*.yaml"))
    kinds = {yaml.safe_load(Path(path).read_text())["kind"] for path in manifests}
    assert kinds >= {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget"}
    result = subprocess.run([str(kubernetes_validate()), "--strict", *manifests],
                            capture_output=True, text=True, timeout=50, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_checks_haproxy_accepts_the_compose_config() -> None:
    result = subprocess.run([require_haproxy(), "-c", "-f", str(DEPLOY / "haproxy.cfg")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def k8s(kind: str) -> dict[str, Any]:
    for path in (DEPLOY / "k8s").glob("*.yaml"):
        document: dict[str, Any] = yaml.safe_load(path.read_text())
        if document["kind"] == kind:
            return document
    raise AssertionError(f"no {kind} in deploy/k8s")


def test_checks_compose_references_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which does not exist"
        if "build" in service:
            context = DEPLOY / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), f"{name}: no Dockerfile"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", dockerfile, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    haproxy_servers = re.findall(r"^\s*server \S+ ([\w-]+):8080", (DEPLOY / "haproxy.cfg").read_text(), re.MULTILINE)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t.split(":")[0] for job in prometheus["scrape_configs"]
               for static in job.get("static_configs", []) for t in static["targets"]]
    for rules in prometheus.get("rule_files", []):
        assert (DEPLOY / "prometheus" / rules).is_file(), f"prometheus.yml loads {rules}, which does not exist"
    gateways = [name for name, service in services.items() if service.get("image") == "llm-proxy:local"]
    assert sorted(haproxy_servers) == sorted(targets) == sorted(gateways) == ["llm-proxy-1", "llm-proxy-2"]


def test_checks_gateway_config_and_configmap_agree() -> None:
    text = (DEPLOY / "gateway.yaml").read_text()
    assert k8s("ConfigMap")["data"]["config.yaml"] == text, "deploy/k8s/configmap.yaml differs from gateway.yaml"
    env = {**os.environ, "APP_KEY": "k", "OPENAI_API_KEY": "k", "REDIS_URL": "redis://redis:6379/0"}
    check = subprocess.run([str(BIN / "llm-proxy"), "check-config", str(DEPLOY / "gateway.yaml")],
                           env=env, capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    secret_keys = set(k8s("Secret")["stringData"])
    assert set(re.findall(r"\$\{(\w+)\}", text)) <= secret_keys, "every required variable is in the Secret"


def test_checks_drain_timings_agree() -> None:
    server = yaml.safe_load(re.sub(r"\$\{[^}]*\}", "x", (DEPLOY / "gateway.yaml").read_text()))["server"]
    drain, grace = server["drain_delay_s"], server["shutdown_grace_s"]
    pod = k8s("Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop >= drain
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + grace
    probe = container["readinessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] < drain
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    stop_grace = compose["services"]["llm-proxy-1"]["stop_grace_period"]
    assert int(stop_grace.rstrip("s")) > drain + grace
    check = re.search(r"inter (\d+)s fall (\d+)", (DEPLOY / "haproxy.cfg").read_text())
    assert check is not None and int(check[1]) * (int(check[2]) + 1) < drain, "haproxy notices within the drain delay"
