"""The `azure` provider type: its stream normaliser and classifier on recorded payloads, then end to
end — the official `openai` SDK through the running gateway to a fake Azure OpenAI resource
(tests/fakeazure.py) that records the exact request target, headers and bytes it received.
"""

from __future__ import annotations

import hashlib
from types import MappingProxyType
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from proxy.config import (
    AccountConfig, BreakerConfig, Config, ConfigError, KeyConfig, LoggingConfig, ModelConfig, ProviderConfig,
    RoutingConfig, ServerConfig, Target, Timeouts,
)
from proxy.configfile import parse_config
from proxy.faults import DEFAULT_COOLDOWN_S, Fault
from proxy.providers import azure as azure_module
from proxy.providers import build
from proxy.providers.azure import AzureProvider, AzureStream, classify_azure, stream_usage

from .conftest import KEY
from .fakeazure import (
    API_KEY, API_KEY_2, CONTENT_FILTER, DEPLOYMENT, FILTER_CHUNKS, KEPT_CHUNKS, PROMPT_FILTER, UNDERLYING, ErrorReply,
    Reply, client_view, start_resource, stream_events, tool_call,
)

NOW = 1000.0
WALL = 1_700_000_000.0
ADMIN_KEY = "adm-azure"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
PATIENT = BreakerConfig(consecutive_failures=1000, min_requests=1000)
TIMEOUTS = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=20)


@pytest.mark.parametrize("event", FILTER_CHUNKS.values(), ids=FILTER_CHUNKS.keys())
def test_azures_filter_chunks_never_reach_the_client(event: bytes) -> None:
    assert AzureStream(strip_usage=False).feed(event) == b""


@pytest.mark.parametrize("event", KEPT_CHUNKS.values(), ids=KEPT_CHUNKS.keys())
def test_every_other_event_passes_byte_for_byte(event: bytes) -> None:
    assert AzureStream(strip_usage=False).feed(event) == event


RECORDED = stream_events(Reply(content="Hello there, world"), UNDERLYING, usage=True)


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("strip_usage", [False, True])
def test_a_recorded_stream_comes_out_the_same_however_it_is_cut(piece: int, strip_usage: bool) -> None:
    stream = AzureStream(strip_usage=strip_usage)
    raw = b"".join(RECORDED)
    out = b"".join(stream.feed(raw[i : i + piece]) for i in range(0, len(raw), piece))
    assert out == client_view(RECORDED, usage=not strip_usage)
    assert stream.done and stream.usage == orjson.loads(RECORDED[-2].removeprefix(b"data: "))["usage"]


def test_b20_the_usage_chunk_is_read_and_stripped_and_the_filter_chunk_is_not_taken_for_it() -> None:
    stream = AzureStream(strip_usage=True)
    out = b"".join(stream.feed(event) for event in RECORDED)
    events = [orjson.loads(e[6:]) for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert all(event["choices"] for event in events)  # no empty-choices chunk, filter or usage
    assert stream.usage is not None and stream.usage["total_tokens"] == 12


def test_ordinary_chunks_are_never_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = azure_module.event_json

    def counting(event: bytes) -> Any:
        parsed.append(event)
        return real(event)

    monkeypatch.setattr(azure_module, "event_json", counting)
    stream = AzureStream(strip_usage=False)
    ordinary = [e for e in RECORDED if b'"delta"' in e]
    assert stream.feed(b"".join(ordinary)) == b"".join(ordinary)
    assert parsed == []
    stream.feed(FILTER_CHUNKS["the prompt-filter first event"])
    assert len(parsed) == 1


RATE_LIMITED = ErrorReply.rate_limited().body
WITH_WAIT = ErrorReply.rate_limited("Rate limit exceeded. Please retry after 6 seconds.").body
CLASSIFIED: dict[str, tuple[int, dict[str, str], bytes, Fault, float | None]] = {
    "429 retry-after-ms": (429, {"retry-after-ms": "6500", "retry-after": "7"}, WITH_WAIT, Fault.COOLDOWN, 7.0),
    "429 retry-after-ms alone": (429, {"retry-after-ms": "6500"}, WITH_WAIT, Fault.COOLDOWN, 6.5),
    "429 retry-after": (429, {"retry-after": "2"}, WITH_WAIT, Fault.COOLDOWN, 2.0),
    "429 x-ratelimit-reset-tokens in plain seconds": (
        429, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "8"}, RATE_LIMITED, Fault.COOLDOWN, 8.0),
    "429 x-ratelimit-reset-requests": (
        429, {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "3",
              "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "50"}, RATE_LIMITED, Fault.COOLDOWN, 3.0),
    "429 the reset of a dimension with room is no hint": (
        429, {"x-ratelimit-remaining-requests": "12", "x-ratelimit-reset-requests": "40"}, WITH_WAIT, Fault.COOLDOWN, 6.0),
    "429 retry after N seconds in the message": (429, {}, WITH_WAIT, Fault.COOLDOWN, 6.0),
    "429 try again in N seconds": (
        429, {}, ErrorReply.azure(429, "429", "Rate limit is exceeded. Try again in 26 seconds.").body, Fault.COOLDOWN, 26.0),
    "429 retry after 1 second": (
        429, {}, ErrorReply.rate_limited("Please retry after 1 second.").body, Fault.COOLDOWN, 1.0),
    "429 with no hint": (429, {}, RATE_LIMITED, Fault.COOLDOWN, DEFAULT_COOLDOWN_S),
    "429 quota": (
        429, {}, ErrorReply.azure(429, "429", "The monthly quota of your subscription is exhausted.").body, Fault.DISABLE, None),
    "429 insufficient_quota": (
        429, {"retry-after": "5"}, ErrorReply.azure(429, "insufficient_quota", "You exceeded your current quota").body,
        Fault.DISABLE, None),
    "404 DeploymentNotFound": (404, {}, ErrorReply.azure(404, "DeploymentNotFound", "The API deployment ...").body,
                               Fault.TRANSIENT, None),
    "404 Resource not found": (404, {}, ErrorReply.azure(404, "404", "Resource not found").body, Fault.TRANSIENT, None),
    "400 the prompt filter": (400, {}, ErrorReply.prompt_filtered().body, Fault.CALLER, None),
    "400": (400, {}, ErrorReply.azure(400, "BadRequest", "Unrecognized request argument supplied: foo").body, Fault.CALLER, None),
    "413": (413, {}, b"<html>Request Entity Too Large</html>", Fault.CALLER, None),
    "401": (401, {}, ErrorReply.azure(401, "401", "Access denied due to invalid subscription key").body, Fault.QUARANTINE, None),
    "403": (403, {}, ErrorReply.azure(403, "403", "Public access is disabled").body, Fault.QUARANTINE, None),
    "500": (500, {}, ErrorReply.azure(500, "InternalServerError", "Internal error").body, Fault.TRANSIENT, None),
    "503 not JSON": (503, {}, b"Service Unavailable", Fault.TRANSIENT, None),
}


@pytest.mark.parametrize(("status", "headers", "body", "fault", "wait"), CLASSIFIED.values(), ids=CLASSIFIED.keys())
def test_classification_of_azures_answers(
    status: int, headers: dict[str, str], body: bytes, fault: Fault, wait: float | None
) -> None:
    verdict = classify_azure(status, headers, body, NOW, wall_now=WALL)
    assert verdict.fault is fault
    assert not verdict.shared
    if wait is not None:
        assert verdict.until == pytest.approx(NOW + wait)


# ---- end to end


def azure(name: str, url: str, *keys: str, api_version: str = "2024-10-21", priority: int = 0) -> ProviderConfig:
    accounts = tuple(AccountConfig(name=f"{name}-{n}", api_key=key, priority=priority) for n, key in enumerate(keys, 1))
    return ProviderConfig(name=name, type="azure", base_url=url, timeouts=TIMEOUTS, breaker=PATIENT,
                          accounts=accounts, api_version=api_version)


def config(*providers: ProviderConfig) -> Config:
    model = ModelConfig(name="gpt-4o", targets=tuple(Target(p.name, DEPLOYMENT) for p in providers))
    return Config(
        server=ServerConfig(admin_key=ADMIN_KEY),
        keys=(KeyConfig(name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest()),),
        providers=MappingProxyType({p.name: p for p in providers}),
        models=MappingProxyType({"gpt-4o": model}),
        routing=RoutingConfig(max_attempts=3),
        logging=LoggingConfig(access_log=False),
    )


async def admin_state(http: Any, gateway: Any) -> list[dict[str, Any]]:
    async with http.get(f"{gateway.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        accounts: list[dict[str, Any]] = (await response.json())["accounts"]
    return accounts


async def test_the_fake_is_what_the_official_azure_client_expects(aiohttp_server: Any) -> None:
    fake, url = await start_resource(aiohttp_server)
    endpoint = url.removesuffix("/openai")
    async with openai.AsyncAzureOpenAI(azure_endpoint=endpoint, api_key=API_KEY, api_version="2024-10-21", max_retries=0) as client:
        completion = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES)
        stream = await client.chat.completions.create(model=DEPLOYMENT, messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert completion.choices[0].message.content == "Hello there" and completion.model == UNDERLYING
    assert [(r.method, r.target) for r in fake.requests] == [
        ("POST", f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-10-21")] * 2
    assert fake.requests[0].headers["api-key"] == API_KEY
    assert chunks[0].choices == [] and chunks[0].id == ""  # Azure's prompt-filter event, as clients see it raw
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta) == "Hello there"


async def test_a_json_answer_goes_to_the_deployment_with_the_api_key_only(
    aiohttp_server: Any, start_gateway: Any, http: Any
) -> None:
    fake, url = await start_resource(aiohttp_server)
    gateway = await start_gateway(config(azure("az", url, API_KEY)))
    sent = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"seed":7}'
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "x-api-key": KEY, "api-key": KEY}
    async with http.post(f"{gateway.url}/v1/chat/completions", data=sent, headers=headers) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["prompt_filter_results"] == PROMPT_FILTER  # relayed as it came
    assert answer["choices"][0]["content_filter_results"] == CONTENT_FILTER
    received = fake.requests[-1]
    assert (received.method, received.target) == ("POST", f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-10-21")
    assert received.headers["api-key"] == API_KEY
    assert "authorization" not in received.headers and "x-api-key" not in received.headers
    assert not [name for name, value in received.headers.items() if KEY in value]
    assert received.body == sent.replace(b'"model":"gpt-4o"', b'"model":"gpt4o-prod"')


async def test_api_version_v1_posts_to_v1_with_the_deployment_as_the_model(
    aiohttp_server: Any, start_gateway: Any
) -> None:
    fake, url = await start_resource(aiohttp_server)
    gateway = await start_gateway(config(azure("az", url, API_KEY, api_version="v1")))
    completion = await gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    received = fake.requests[-1]
    assert (received.method, received.target) == ("POST", "/openai/v1/chat/completions")
    assert received.json["model"] == DEPLOYMENT and received.headers["api-key"] == API_KEY
    assert "authorization" not in received.headers


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_stream_reaches_the_client_in_openais_shape(
    aiohttp_server: Any, start_gateway: Any, http: Any, include_usage: bool
) -> None:
    fake, url = await start_resource(aiohttp_server)
    reply = Reply(content="Hello there, world")
    fake.default = reply
    gateway = await start_gateway(config(azure("az", url, API_KEY)))
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        raw = await response.read()
    assert raw == client_view(stream_events(reply, UNDERLYING, usage=True), usage=include_usage)
    assert b'"id":""' not in raw and b"prompt_filter_results" not in raw and b"content_filter_offsets" not in raw
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}  # the gateway settles on it
    stream = await gateway.client().chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": include_usage},
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices and chunk.choices[0].delta is not None for chunk in chunks[: -1 if include_usage else None])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there, world"
    if include_usage:
        assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12


async def test_tool_calls_streamed_and_not(aiohttp_server: Any, start_gateway: Any) -> None:
    fake, url = await start_resource(aiohttp_server)
    calls = [tool_call("call_A1", "get_weather", '{"city":"Paris"}'), tool_call("call_B2", "now", "{}")]
    fake.default = Reply(content=None, tool_calls=calls, finish_reason="tool_calls")
    gateway = await start_gateway(config(azure("az", url, API_KEY)))
    client = gateway.client()
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].finish_reason == "tool_calls"
    assert [c.model_dump() for c in completion.choices[0].message.tool_calls or []] == calls
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    got: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = got.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += call.function.name or "" if call.function else ""
            entry["arguments"] += call.function.arguments or "" if call.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert got == {0: {"id": "call_A1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
                   1: {"id": "call_B2", "name": "now", "arguments": "{}"}}


async def test_a_filtered_completion_is_relayed_with_its_content_filter_finish(
    aiohttp_server: Any, start_gateway: Any
) -> None:
    fake, url = await start_resource(aiohttp_server)
    fake.default = Reply(content="Partial answer", finish_reason="content_filter")
    gateway = await start_gateway(config(azure("az", url, API_KEY)))
    client = gateway.client()
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (completion.choices[0].finish_reason, completion.choices[0].message.content) == ("content_filter", "Partial answer")
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    finishes = [chunk.choices[0].finish_reason async for chunk in stream if chunk.choices]
    assert finishes[-1] == "content_filter"


async def test_the_prompt_filters_400_is_the_callers_relayed_unchanged(aiohttp_server: Any, start_gateway: Any) -> None:
    first, first_url = await start_resource(aiohttp_server)
    second, second_url = await start_resource(aiohttp_server)
    first.default = second.default = ErrorReply.prompt_filtered()
    gateway = await start_gateway(config(azure("az1", first_url, API_KEY), azure("az2", second_url, API_KEY)))
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (caught.value.code, caught.value.param) == ("content_filter", "prompt")
    assert caught.value.body == orjson.loads(ErrorReply.prompt_filtered().body)["error"]
    assert len(first.requests) + len(second.requests) == 1  # no retry


HINTS = {
    "retry-after-ms": ({"retry-after-ms": "7000"}, ""),
    "retry-after": ({"retry-after": "7"}, ""),
    "x-ratelimit-reset-tokens": ({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "7"}, ""),
    "the message": ({}, "Requests have exceeded token rate limit. Please retry after 7 seconds."),
}


@pytest.mark.parametrize(("headers", "message"), HINTS.values(), ids=HINTS.keys())
async def test_a_429_cools_the_account_by_azures_hint_and_the_other_key_serves(
    aiohttp_server: Any, start_gateway: Any, http: Any, headers: dict[str, str], message: str
) -> None:
    fake, url = await start_resource(aiohttp_server)
    fake.script(ErrorReply.rate_limited(message, headers))
    gateway = await start_gateway(config(azure("az", url, API_KEY, API_KEY_2)))
    completion = await gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    assert {r.headers["api-key"] for r in fake.requests} == {API_KEY, API_KEY_2}
    cooling = [a for a in await admin_state(http, gateway) if a["cooldown_until"] is not None]
    assert len(cooling) == 1 and 6 < cooling[0]["cooldown_until"] <= 7
    assert cooling[0]["last_error"] == "azure 429"


async def test_b22_deployment_not_found_fails_over_to_an_account_that_serves(
    aiohttp_server: Any, start_gateway: Any, http: Any
) -> None:
    missing, missing_url = await start_resource(aiohttp_server, {})
    serving, serving_url = await start_resource(aiohttp_server)
    gateway = await start_gateway(config(azure("eu", missing_url, API_KEY), azure("us", serving_url, API_KEY, priority=1)))
    completion = await gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    assert len(missing.requests) == len(serving.requests) == 1
    states = {a["account"]: a for a in await admin_state(http, gateway)}
    assert states["eu-1"]["last_error"] == "azure 404 DeploymentNotFound"
    assert states["eu-1"]["quarantined"] is None and states["eu-1"]["disabled"] is None


async def test_deployment_not_found_everywhere_is_a_bad_upstream_response_not_the_callers_404(
    aiohttp_server: Any, start_gateway: Any
) -> None:
    _, url = await start_resource(aiohttp_server, {})
    gateway = await start_gateway(config(azure("az", url, API_KEY)))
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.client().chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert (caught.value.status_code, caught.value.code) == (502, "bad_upstream_response")


@pytest.mark.parametrize(("api_version", "target"), [("2024-10-21", "/openai/models?api-version=2024-10-21"), ("v1", "/openai/v1/models")])
async def test_the_probe_lists_the_resources_models_with_the_accounts_key(
    aiohttp_server: Any, api_version: str, target: str
) -> None:
    fake, url = await start_resource(aiohttp_server)
    provider = AzureProvider(azure("az", url, API_KEY, "wrong-key", api_version=api_version))
    try:
        good, bad = provider.config.accounts
        assert await provider.probe(good) is True
        assert await provider.probe(bad) is False
    finally:
        await provider.close()
    assert [(r.method, r.target) for r in fake.requests] == [("GET", target)] * 2
    assert [r.headers["api-key"] for r in fake.requests] == [API_KEY, "wrong-key"]


CONFIG_FILE = """
keys: [{name: team-a, key: sk-a}]
providers:
  azure-eu:
    type: azure
    base_url: https://myres.openai.azure.com/openai/
    api_version: "2024-10-21"
    accounts: [{name: eu-1, api_key: "${AZURE_KEY}"}]
  azure-v1:
    type: azure
    base_url: https://other.openai.azure.com/openai
    api_version: v1
    accounts: [{name: v1-1, api_key: k}]
models:
  gpt-4o:
    targets: [{provider: azure-eu, model: gpt4o-prod}, {provider: azure-v1, model: gpt4o-prod}]
"""


async def test_a_config_file_with_azure_providers() -> None:
    config = parse_config(CONFIG_FILE, {"AZURE_KEY": "azure-secret"})
    eu, v1 = config.providers["azure-eu"], config.providers["azure-v1"]
    assert (eu.type, eu.base_url, eu.api_version, eu.accounts[0].api_key) == (
        "azure", "https://myres.openai.azure.com/openai", "2024-10-21", "azure-secret")
    assert v1.api_version == "v1"
    for provider_config in (eu, v1):
        provider = build(provider_config, None)
        assert isinstance(provider, AzureProvider)
        await provider.close()
    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG_FILE.replace('    api_version: "2024-10-21"\n', ""), {"AZURE_KEY": "k"})
    assert any(problem.startswith("providers.azure-eu.api_version") for problem in caught.value.problems)


@pytest.mark.parametrize(
    ("api_version", "supports", "asks"),
    [("2024-06-01", None, False), ("2024-10-21", None, True), ("2025-04-01-preview", None, True),
     ("v1", None, True), ("2024-06-01", True, True), ("2025-04-01-preview", False, False)],
)
def test_which_api_versions_are_asked_for_a_streams_usage(api_version: str, supports: bool | None, asks: bool) -> None:
    provider = ProviderConfig(name="az", type="azure", base_url="https://r.openai.azure.com/openai",
                              api_version=api_version, supports_stream_usage=supports)
    assert stream_usage(provider) is asks


async def test_b21_an_api_version_without_stream_usage_never_receives_stream_options(
    aiohttp_server: Any, start_gateway: Any, http: Any
) -> None:
    fake, url = await start_resource(aiohttp_server)
    fake.default = Reply(content="Hello there, world")
    gateway = await start_gateway(config(azure("az", url, API_KEY, api_version="2024-06-01")))
    headers = {"Authorization": f"Bearer {KEY}"}
    body: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200 and (await response.read()).endswith(b"data: [DONE]\n\n")
    assert "stream_options" not in fake.requests[-1].json
    body["stream_options"] = {"include_usage": True}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["code"], error["param"]) == ("unsupported_field", "stream_options")
    assert len(fake.requests) == 1
