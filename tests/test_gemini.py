"""The `gemini` provider type: its answer, stream and error normalisers on recorded payloads, then end
to end — the official `openai` SDK through the running gateway to a fake of Gemini's
OpenAI-compatible endpoint (tests/fakegemini.py) that records the exact request it received.
"""

from __future__ import annotations

import hashlib
import re
from types import MappingProxyType
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from proxy.config import (
    AccountConfig, BreakerConfig, Config, KeyConfig, LoggingConfig, ModelConfig, ProviderConfig, RoutingConfig,
    ServerConfig, Target, Timeouts,
)
from proxy.configfile import parse_config
from proxy.faults import DEFAULT_COOLDOWN_S, Fault
from proxy.providers import build
from proxy.providers import gemini as gemini_module
from proxy.streaming import event_json
from proxy.providers.gemini import (
    QUOTA_COOLDOWN_S, GeminiProvider, GeminiStream, classify_gemini, google_error, normalise_answer,
)
from proxy.upstream import Prepared

from .conftest import KEY
from .fakegemini import (
    API_KEY, API_KEY_2, SIGNATURE, FakeGemini, GoogleError, Reply, call, error_info, quota_failure, retry_info,
    stream_events,
)

NOW = 1000.0
WALL = 1_700_000_000.0
ADMIN_KEY = "adm-gemini"
MODEL = "gemini-2.5-flash"
CALL_ID = re.compile(r"^call_[A-Za-z0-9]{24}$")
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Weather in Paris and the time?"}]
TOOLS: list[ChatCompletionToolParam] = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("get_weather", "now")
]
PATIENT = BreakerConfig(consecutive_failures=1000, min_requests=1000)
TIMEOUTS = Timeouts(connect_s=2, first_byte_s=5, idle_s=5, total_s=20)
WEATHER = call("get_weather", '{"city":"Paris"}', signed=True)
NOW_CALL = call("now", "{}")


def chunks_of(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]


def normalised(events: list[bytes], strip_usage: bool = False) -> tuple[GeminiStream, bytes]:
    stream = GeminiStream(strip_usage=strip_usage)
    return stream, b"".join(stream.feed(event) for event in events)


def test_a_json_answer_that_calls_tools_finishes_with_tool_calls_and_every_call_has_an_id() -> None:
    document = orjson.loads(orjson.dumps({"choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None, "tool_calls": [WEATHER, NOW_CALL]}},
        {"index": 1, "finish_reason": "stop", "message": {"role": "assistant", "content": "No tools"}},
        {"index": 2, "finish_reason": "length", "message": {"role": "assistant", "tool_calls": [call("now", "{}", "given")]}},
    ]}))
    assert normalise_answer(document) is True
    first, second, third = document["choices"]
    assert first["finish_reason"] == "tool_calls" and second["finish_reason"] == "stop" and third["finish_reason"] == "length"
    ids = [c["id"] for c in first["message"]["tool_calls"]]
    assert all(CALL_ID.match(i) for i in ids) and len(set(ids)) == 2
    assert third["message"]["tool_calls"][0]["id"] == "given"
    assert first["message"]["tool_calls"][0]["extra_content"] == SIGNATURE


ANSWERS_LEFT_ALONE = {
    "text": {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}]},
    "tool_calls finish and ids": {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "tool_calls": [call("now", "{}", "call_1")]}}]},
    "tool_calls null": {"choices": [{"index": 0, "finish_reason": "stop", "message": {"tool_calls": None}}]},
    "no choices": {"choices": None},
}


@pytest.mark.parametrize("document", ANSWERS_LEFT_ALONE.values(), ids=ANSWERS_LEFT_ALONE.keys())
async def test_an_answer_gemini_got_right_is_relayed_byte_for_byte(document: dict[str, Any]) -> None:
    body = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    provider = GeminiProvider(gemini("g", "http://127.0.0.1:9/v1beta/openai", API_KEY))
    assert provider.answer(body, Prepared(body=b"")).body is body
    await provider.close()


STREAMS = {
    "the finish in the tool call's chunk": Reply(content=None, tool_calls=[WEATHER, NOW_CALL]),
    "the finish in a later chunk (gemini-3.5)": Reply(content=None, tool_calls=[WEATHER, NOW_CALL], split_finish=True),
    "two calls in one delta": Reply(content=None, tool_calls=[WEATHER, NOW_CALL], calls_per_chunk=2),
    "text, then a call": Reply(content="Let me check.", tool_calls=[WEATHER]),
}


@pytest.mark.parametrize("reply", STREAMS.values(), ids=STREAMS.keys())
def test_b23_a_stream_that_calls_tools_is_indexed_identified_and_finishes_with_tool_calls(reply: Reply) -> None:
    _, out = normalised(stream_events(reply, MODEL, usage=False))
    chunks = chunks_of(out)
    fragments = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert [f["index"] for f in fragments] == list(range(len(reply.tool_calls)))
    assert all(CALL_ID.match(f["id"]) for f in fragments) and len({f["id"] for f in fragments}) == len(fragments)
    assert [f["function"] for f in fragments] == [c["function"] for c in reply.tool_calls]
    assert fragments[0].get("extra_content") == SIGNATURE  # Gemini's thought signature survives
    finishes = [chunk["choices"][0].get("finish_reason") for chunk in chunks]
    assert [f for f in finishes if f is not None] == ["tool_calls"]
    assert out.endswith(b"data: [DONE]\n\n")


def test_a_fragment_without_id_or_name_continues_the_last_call_and_keeps_its_id() -> None:
    head = {"id": "gm-1", "object": "chat.completion.chunk", "model": MODEL}

    def event(calls: list[dict[str, Any]], finish: str | None = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": {"tool_calls": calls}, "finish_reason": finish}
        return b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n"

    events = [
        event([{"id": "", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":'}}]),
        event([{"id": "", "function": {"arguments": '"Paris"}'}}]),
        event([{"function": {"arguments": ""}}]),
        event([{"id": "g-2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]),
        event([{"id": "g-2", "function": {"arguments": ""}}], "stop"),
    ]
    _, out = normalised(events)
    fragments = [chunk["choices"][0]["delta"]["tool_calls"][0] for chunk in chunks_of(out)]
    assert [f["index"] for f in fragments] == [0, 0, 0, 1, 1]
    assert fragments[0]["id"] == fragments[1]["id"] and "id" not in fragments[2]
    assert [f["id"] for f in fragments[3:]] == ["g-2", "g-2"]
    assert chunks_of(out)[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_text_stream_passes_byte_for_byte_and_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[bytes] = []
    real = event_json

    def counting(event: bytes) -> Any:
        parsed.append(event)
        return real(event)

    monkeypatch.setattr(gemini_module, "event_json", counting)
    events = stream_events(Reply(content="Plain words, and one says stop."), MODEL, usage=True)
    stream, out = normalised(events)
    assert out == b"".join(events) and parsed == [] and stream.done
    assert stream.usage == {"completion_tokens": 4, "prompt_tokens": 8, "total_tokens": 12}


def test_a_stream_cut_anywhere_normalises_the_same() -> None:
    events = stream_events(Reply(content="Checking", tool_calls=[WEATHER, NOW_CALL], split_finish=True), MODEL, usage=True)
    raw = b"".join(events)
    _, whole = normalised(events)
    for piece in (1, 5, 33):
        stream = GeminiStream(strip_usage=False)
        out = b"".join(stream.feed(raw[i : i + piece]) for i in range(0, len(raw), piece))
        assert [_without_ids(c) for c in chunks_of(out)] == [_without_ids(c) for c in chunks_of(whole)]


def _without_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    for choice in chunk["choices"]:
        for fragment in choice["delta"].get("tool_calls") or []:
            fragment["id"] = CALL_ID.sub("call_", fragment["id"])
    return chunk


INVALID = GoogleError(400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified")
QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."
CLASSIFIED: dict[str, tuple[int, dict[str, str], bytes, Fault, float | None, bool]] = {
    "400 INVALID_ARGUMENT, list-wrapped": (400, {}, INVALID.body(), Fault.CALLER, None, False),
    "400 INVALID_ARGUMENT": (400, {}, GoogleError(400, "INVALID_ARGUMENT", "bad", wrapped=False).body(), Fault.CALLER, None, False),
    "400 API_KEY_INVALID": (400, {}, GoogleError(400, "INVALID_ARGUMENT", "API key not valid.", [error_info("API_KEY_INVALID")]).body(),
                            Fault.QUARANTINE, None, False),
    "400 FAILED_PRECONDITION": (400, {}, GoogleError(400, "FAILED_PRECONDITION", "enable billing").body(), Fault.QUARANTINE, None, False),
    "401 UNAUTHENTICATED": (401, {}, GoogleError(401, "UNAUTHENTICATED", "no").body(), Fault.QUARANTINE, None, False),
    "403 PERMISSION_DENIED": (403, {}, GoogleError(403, "PERMISSION_DENIED", "no").body(), Fault.QUARANTINE, None, False),
    "404 NOT_FOUND": (404, {}, GoogleError(404, "NOT_FOUND", "models/x is not found").body(), Fault.TRANSIENT, None, False),
    "404 not JSON": (404, {}, b"<html>Not Found</html>", Fault.TRANSIENT, None, False),
    "429 RetryInfo": (429, {"retry-after": "2"}, GoogleError(429, "RESOURCE_EXHAUSTED", QUOTA_MESSAGE,
                      [quota_failure("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"), retry_info("33s")]).body(),
                      Fault.COOLDOWN, 33.0, False),
    "429 RetryInfo with fractions": (429, {}, GoogleError(429, "RESOURCE_EXHAUSTED", "slow", [retry_info("1.5s")]).body(),
                                     Fault.COOLDOWN, 1.5, False),
    "429 retry-after": (429, {"retry-after": "9"}, GoogleError(429, "RESOURCE_EXHAUSTED", "Resource exhausted.").body(),
                        Fault.COOLDOWN, 9.0, False),
    "429 a daily quota": (429, {}, GoogleError(429, "RESOURCE_EXHAUSTED", "Quota exceeded.",
                          [quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier")]).body(),
                          Fault.COOLDOWN, QUOTA_COOLDOWN_S, False),
    "429 your current quota": (429, {}, GoogleError(429, "RESOURCE_EXHAUSTED", QUOTA_MESSAGE).body(),
                               Fault.COOLDOWN, QUOTA_COOLDOWN_S, False),
    "429 try again later": (429, {}, GoogleError(429, "RESOURCE_EXHAUSTED", "Resource exhausted. Please try again later.").body(),
                            Fault.COOLDOWN, DEFAULT_COOLDOWN_S, False),
    "429 not JSON": (429, {}, b"Too Many Requests", Fault.COOLDOWN, DEFAULT_COOLDOWN_S, False),
    "503 UNAVAILABLE": (503, {}, GoogleError(503, "UNAVAILABLE", "The model is overloaded.").body(), Fault.TRANSIENT, None, True),
    "500 INTERNAL": (500, {}, GoogleError(500, "INTERNAL", "An internal error has occurred.").body(), Fault.TRANSIENT, None, False),
    "504 DEADLINE_EXCEEDED": (504, {}, GoogleError(504, "DEADLINE_EXCEEDED", "Deadline expired").body(), Fault.TRANSIENT, None, False),
    "502 not JSON": (502, {}, b"Bad Gateway", Fault.TRANSIENT, None, False),
    "413 not JSON": (413, {}, b"Request Entity Too Large", Fault.CALLER, None, False),
}


@pytest.mark.parametrize(("status", "headers", "body", "fault", "wait", "shared"), CLASSIFIED.values(), ids=CLASSIFIED.keys())
def test_classification_by_googles_status(
    status: int, headers: dict[str, str], body: bytes, fault: Fault, wait: float | None, shared: bool
) -> None:
    verdict = classify_gemini(status, headers, body, NOW, wall_now=WALL)
    assert (verdict.fault, verdict.shared) == (fault, shared)
    if wait is not None:
        assert verdict.until == pytest.approx(NOW + wait)


async def test_a_list_wrapped_error_is_unwrapped_and_relayed_openai_shaped() -> None:
    assert google_error(INVALID.body()) == (orjson.loads(INVALID.body())[0]["error"], True)
    provider = GeminiProvider(gemini("g", "http://127.0.0.1:9/v1beta/openai", API_KEY))
    body, headers = provider.relay(400, {"Content-Type": "application/json"}, INVALID.body())
    assert orjson.loads(body) == {"error": {"message": INVALID.message, "type": "invalid_request_error",
                                            "param": None, "code": "INVALID_ARGUMENT"}}
    plain = GoogleError(400, "INVALID_ARGUMENT", "bad", wrapped=False).body()
    assert provider.relay(400, {"Content-Type": "application/json"}, plain)[0] is plain  # already an object: as it came
    await provider.close()


# ---- end to end


def gemini(name: str, url: str, *keys: str) -> ProviderConfig:
    accounts = tuple(AccountConfig(name=f"{name}-{n}", api_key=key) for n, key in enumerate(keys, 1))
    return ProviderConfig(name=name, type="gemini", base_url=url, timeouts=TIMEOUTS, breaker=PATIENT, accounts=accounts)


def config(*providers: ProviderConfig) -> Config:
    model = ModelConfig(name="gemini", targets=tuple(Target(p.name, MODEL) for p in providers))
    return Config(
        server=ServerConfig(admin_key=ADMIN_KEY),
        keys=(KeyConfig(name="team-a", key_sha256=hashlib.sha256(KEY.encode()).hexdigest()),),
        providers=MappingProxyType({p.name: p for p in providers}),
        models=MappingProxyType({"gemini": model}),
        routing=RoutingConfig(max_attempts=3),
        logging=LoggingConfig(access_log=False),
    )


@pytest.fixture
async def fake(aiohttp_server: Any) -> tuple[FakeGemini, str]:
    upstream = FakeGemini(api_keys=(API_KEY, API_KEY_2))
    server = await aiohttp_server(upstream.app())
    return upstream, str(server.make_url("/v1beta/openai"))


async def test_the_fake_shows_geminis_quirks_to_the_official_sdk(fake: tuple[FakeGemini, str]) -> None:
    upstream, url = fake
    upstream.default = Reply(content=None, tool_calls=[WEATHER])
    async with openai.AsyncOpenAI(base_url=url, api_key=API_KEY, max_retries=0) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, stream=True)
        chunks = [chunk async for chunk in stream]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=[])
    fragment = (chunks[0].choices[0].delta.tool_calls or [])[0]
    assert "index" not in fragment.model_dump(exclude_unset=True) and fragment.id == ""
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert isinstance(caught.value.body, list)  # what the SDK cannot read an error from
    assert (upstream.requests[0].method, upstream.requests[0].target) == ("POST", "/v1beta/openai/chat/completions")


async def test_a_json_answer_with_tool_calls_through_the_gateway(
    fake: tuple[FakeGemini, str], start_gateway: Any, http: Any
) -> None:
    upstream, url = fake
    upstream.default = Reply(content=None, tool_calls=[WEATHER, NOW_CALL])
    gateway = await start_gateway(config(gemini("g", url, API_KEY)))
    completion = await gateway.client().chat.completions.create(model="gemini", messages=MESSAGES, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "now"]
    assert all(CALL_ID.match(c.id) for c in calls) and calls[0].model_extra == {"extra_content": SIGNATURE}
    received = upstream.requests[-1]
    assert (received.method, received.target) == ("POST", "/v1beta/openai/chat/completions")
    assert received.headers["authorization"] == f"Bearer {API_KEY}"
    assert not [name for name, value in received.headers.items() if KEY in value]
    sent = b'{"model":"gemini","messages":[{"role":"user","content":"hi"}],"reasoning_effort":"low"}'
    async with http.post(f"{gateway.url}/v1/chat/completions", data=sent,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert upstream.requests[-1].body == sent.replace(b'"model":"gemini"', b'"model":"gemini-2.5-flash"')


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_streamed_tool_call_through_the_gateway(
    fake: tuple[FakeGemini, str], start_gateway: Any, include_usage: bool
) -> None:
    upstream, url = fake
    upstream.default = Reply(content="Checking.", tool_calls=[WEATHER, NOW_CALL], split_finish=True)
    gateway = await start_gateway(config(gemini("g", url, API_KEY)))
    stream = await gateway.client().chat.completions.create(
        model="gemini", messages=MESSAGES, tools=TOOLS, stream=True, stream_options={"include_usage": include_usage},
    )
    got: dict[int, dict[str, str]] = {}
    content, finish, usage = "", None, None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for fragment in choice.delta.tool_calls or []:
                entry = got.setdefault(fragment.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += fragment.id or ""
                entry["name"] += (fragment.function.name or "") if fragment.function else ""
                entry["arguments"] += (fragment.function.arguments or "") if fragment.function else ""
    assert (content, finish) == ("Checking.", "tool_calls")
    assert [(e["name"], e["arguments"]) for e in got.values()] == [("get_weather", '{"city":"Paris"}'), ("now", "{}")]
    assert sorted(got) == [0, 1] and all(CALL_ID.match(e["id"]) for e in got.values())
    assert usage is not None and usage.total_tokens == 12  # Gemini puts it on its last chunk
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_a_list_wrapped_400_reaches_the_sdk_as_a_bad_request_with_googles_message(
    fake: tuple[FakeGemini, str], start_gateway: Any
) -> None:
    upstream, url = fake
    upstream.default = INVALID
    gateway = await start_gateway(config(gemini("g", url, API_KEY, API_KEY_2)))
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.client().chat.completions.create(model="gemini", messages=MESSAGES)
    assert caught.value.body == {"message": INVALID.message, "type": "invalid_request_error", "param": None,
                                 "code": "INVALID_ARGUMENT"}
    assert caught.value.message == f"Error code: 400 - {INVALID.message}"
    assert len(upstream.requests) == 1  # the caller's fault: no retry


async def test_resource_exhausted_cools_the_account_by_retry_info_and_the_other_key_serves(
    fake: tuple[FakeGemini, str], start_gateway: Any, http: Any
) -> None:
    upstream, url = fake
    upstream.script(GoogleError(429, "RESOURCE_EXHAUSTED", QUOTA_MESSAGE, [retry_info("33s")]))
    gateway = await start_gateway(config(gemini("g", url, API_KEY, API_KEY_2)))
    completion = await gateway.client().chat.completions.create(model="gemini", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    async with http.get(f"{gateway.url}/admin/state", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as response:
        accounts = (await response.json())["accounts"]
    cooling = [a for a in accounts if a["cooldown_until"] is not None]
    assert len(cooling) == 1 and 32 < cooling[0]["cooldown_until"] <= 33


@pytest.mark.parametrize(("reply", "status", "code"), [
    (GoogleError(503, "UNAVAILABLE", "The model is overloaded. Please try again later."), 502, "bad_upstream_response"),
    (GoogleError(403, "PERMISSION_DENIED", "Permission denied on resource project."), 503, "no_account_available"),
], ids=["503 UNAVAILABLE", "403 PERMISSION_DENIED"])
async def test_unavailable_and_permission_denied_fail_over(
    fake: tuple[FakeGemini, str], start_gateway: Any, reply: GoogleError, status: int, code: str
) -> None:
    upstream, url = fake
    upstream.script(reply)
    gateway = await start_gateway(config(gemini("g", url, API_KEY, API_KEY_2)))
    client = gateway.client()
    completion = await client.chat.completions.create(model="gemini", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there" and len(upstream.requests) == 2
    upstream.default = reply
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(model="gemini", messages=MESSAGES)
    assert (caught.value.status_code, caught.value.code) == (status, code)


async def test_the_probe_lists_models_with_the_accounts_bearer_key(fake: tuple[FakeGemini, str]) -> None:
    upstream, url = fake
    provider = GeminiProvider(gemini("g", url, API_KEY, "wrong-key"))
    try:
        good, bad = provider.config.accounts
        assert (await provider.probe(good), await provider.probe(bad)) == (True, False)
    finally:
        await provider.close()
    assert [(r.method, r.target) for r in upstream.requests] == [("GET", "/v1beta/openai/models")] * 2


async def test_a_config_file_with_a_gemini_provider() -> None:
    text = """
keys: [{name: team-a, key: sk-a}]
providers:
  gemini:
    type: gemini
    base_url: https://generativelanguage.googleapis.com/v1beta/openai/
    accounts: [{name: g-1, api_key: "${GEMINI_API_KEY}"}]
models:
  gemini-flash:
    targets: [{provider: gemini, model: gemini-2.5-flash}]
"""
    provider_config = parse_config(text, {"GEMINI_API_KEY": "AIza-secret"}).providers["gemini"]
    assert (provider_config.type, provider_config.base_url, provider_config.accounts[0].api_key) == (
        "gemini", "https://generativelanguage.googleapis.com/v1beta/openai", "AIza-secret")
    provider = build(provider_config, None)
    assert isinstance(provider, GeminiProvider)
    await provider.close()
