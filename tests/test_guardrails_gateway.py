"""Guardrails through the running gateway with the official openai SDK: block (the exact SPEC
§11 body, before admission), redact (the bytes the upstream received), log (metric and access
log), answers redacted in JSON and streams, and hostile input that must not stall anything."""

from __future__ import annotations

import asyncio
import dataclasses
from types import MappingProxyType
from typing import Any

import openai
import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy.accesslog import AccessLog
from proxy.config import Config, GuardrailConfig, Limits

from .conftest import KEY, Upstream, completion_body, completion_handler, make_config, sse_events, stream_handler
from .test_metrics import scrape, value

EMAIL = "john.doe@example.com"
CARD = "4111 1111 1111 1111"


def guarded(config: Config, *rails: GuardrailConfig, key_limits: Limits = Limits(), on_model: bool = False) -> Config:
    """`config` with `rails` defined and attached to team-a (or, `on_model`, to gpt-test)."""
    names = tuple(rail.name for rail in rails)
    keys = list(config.keys)
    models = dict(config.models)
    if on_model:
        models["gpt-test"] = dataclasses.replace(models["gpt-test"], guardrails=names)
    else:
        keys[0] = dataclasses.replace(keys[0], guardrails=names)
    keys[0] = dataclasses.replace(keys[0], limits=key_limits)
    return dataclasses.replace(
        config, keys=tuple(keys), models=MappingProxyType(models),
        guardrails=MappingProxyType({rail.name: rail for rail in rails}),
    )


def rail(name: str, action: str, **fields: Any) -> GuardrailConfig:
    return GuardrailConfig(name=name, type=fields.pop("type", "pii"), action=action, **fields)



async def test_block_answers_the_exact_body_before_admission(upstream: Upstream, start_gateway: Any) -> None:
    config = guarded(make_config([upstream.url]), rail("pii-checker", "block"), key_limits=Limits(rpm=10))
    gateway = await start_gateway(config)
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.with_raw_response.create(
            model="gpt-test",
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"I am {EMAIL}"}],
            extra_headers={"X-Request-Id": "req-guard-1"},
        )
    response = raised.value.response
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "req-guard-1"
    assert "x-ratelimit-remaining-requests" not in response.headers, "refused before admission"
    assert orjson.loads(response.content) == {
        "error": {
            "message": "Content blocked by guardrail", "type": "guardrail_block", "param": None,
            "code": "guardrail_block", "guardrail_key": "pii-checker", "action": "block",
            "findings": [{"category": "email", "message": "PII detected", "location": "messages[1].content"}],
        }
    }
    assert EMAIL.encode() not in response.content
    assert upstream.requests == []
    ok = await client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello"}]
    )
    assert ok.headers["x-ratelimit-remaining-requests"] == "9", "the blocked request took no token"


async def test_the_key_and_the_model_guardrails_all_run_and_block_wins(
    upstream: Upstream, start_gateway: Any, log_lines: tuple[AccessLog, asyncio.StreamReader]
) -> None:
    access_log, lines = log_lines
    config = guarded(make_config([upstream.url]), rail("masker", "redact"))
    models = dict(config.models)
    models["gpt-test"] = dataclasses.replace(models["gpt-test"], guardrails=("cards",))
    config = dataclasses.replace(config, models=MappingProxyType(models), guardrails=MappingProxyType(
        {**config.guardrails, "cards": rail("cards", "block", categories=("credit_card", "secret"))}
    ))
    gateway = await start_gateway(config, access_log=access_log)
    with pytest.raises(openai.BadRequestError) as raised:
        await gateway.client().chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": [{"type": "text", "text": f"{EMAIL} {CARD}"}]}]
        )
    error = raised.value.body
    assert isinstance(error, dict)
    assert error["guardrail_key"] == "cards"
    assert error["findings"] == [
        {"category": "credit_card", "message": "PII detected", "location": "messages[0].content[0].text"}
    ]
    record = orjson.loads(await lines.readline())
    assert record["status"] == 400 and record["guardrails"] == ["masker", "cards"]
    assert upstream.requests == []


async def test_redact_forwards_the_masked_body_and_clean_requests_byte_for_byte(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    gateway = await start_gateway(guarded(make_config([upstream.url]), rail("masker", "redact"), on_model=True))
    await gateway.client().chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": f"Mail {EMAIL}, card {CARD}."}],
        tools=[{"type": "function", "function": {"name": "f", "description": "x@example.com"}}],
    )
    sent = orjson.loads(upstream.requests[0]["body"])
    assert sent["messages"][0]["content"] == "Mail [REDACTED:EMAIL], card [REDACTED:CREDIT_CARD]."
    assert sent["tools"][0]["function"]["description"] == "x@example.com", "only message text is looked at"
    assert sent["model"] == "upstream-model"
    assert EMAIL.encode() not in upstream.requests[0]["body"]
    clean = b'{"model" : "same-name",  "messages":[{"role":"user","content":"nothing here"}]}'
    async with http.post(f"{gateway.url}/v1/chat/completions", data=clean,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert upstream.requests[1]["body"] == clean, "no findings: the client's exact bytes"


async def test_log_counts_and_forwards_unchanged(
    http: Any, upstream: Upstream, start_gateway: Any, log_lines: tuple[AccessLog, asyncio.StreamReader]
) -> None:
    access_log, lines = log_lines
    config = guarded(make_config([upstream.url]), rail("watcher", "log"))
    gateway = await start_gateway(config, access_log=access_log, registry=CollectorRegistry())
    body = orjson.dumps({"model": "gpt-test", "messages": [
        {"role": "user", "content": f"{EMAIL} and {EMAIL}"}, {"role": "user", "content": "203.0.113.5"}]})
    async with http.post(f"{gateway.url}/v1/chat/completions", data=body,
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as response:
        assert response.status == 200
    assert orjson.loads(upstream.requests[0]["body"])["messages"][0]["content"] == f"{EMAIL} and {EMAIL}"
    record = orjson.loads(await lines.readline())
    assert record["guardrails"] == ["watcher"]
    assert EMAIL not in orjson.dumps(record).decode()
    samples = await scrape(http, gateway.url)
    name = "llm_proxy_guardrail_findings_total"
    assert value(samples, name, guardrail="watcher", category="email", action="log") == 2
    assert value(samples, name, guardrail="watcher", category="ip_address", action="log") == 1
    assert not any(EMAIL in str(labels) for _, labels in samples)


async def test_json_answer_redacted(upstream: Upstream, start_gateway: Any) -> None:
    upstream.handler = completion_handler(body=orjson.dumps(completion_body(f"Reach me at {EMAIL}.")))
    config = guarded(make_config([upstream.url]), rail("answers", "redact", apply_to=frozenset({"response"})))
    gateway = await start_gateway(config)
    completion = await gateway.client().chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": f"Who is {EMAIL}?"}]
    )
    assert completion.choices[0].message.content == "Reach me at [REDACTED:EMAIL]."
    assert EMAIL in orjson.loads(upstream.requests[0]["body"])["messages"][0]["content"], "requests untouched"


async def test_stream_redacted_across_every_split(upstream: Upstream, start_gateway: Any) -> None:
    text = f"Write to {EMAIL} now"
    config = guarded(make_config([upstream.url]), rail("answers", "redact", apply_to=frozenset({"response"})))
    gateway = await start_gateway(config)
    client = gateway.client()
    for cut in range(len("Write to "), len("Write to ") + len(EMAIL) + 1, 3):
        upstream.handler = stream_handler(sse_events([text[:cut], text[cut:]]))
        stream = await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Write to [REDACTED:EMAIL] now"


async def test_hostile_prompt_and_pattern_neither_hang_nor_stall_others(
    http: Any, upstream: Upstream, start_gateway: Any
) -> None:
    """1 MB of near-misses, and `(a+)+$` (catastrophic for a backtracking engine) on 1 MB of
    `a`s ending in `b`: both finish, and a request on another key is served meanwhile. RE2
    makes the pattern linear; scans of large texts run off the event loop."""
    near_misses = "order 1234567890123456 on 2024-01-15 v1.2.3.4 8812 3345 6678 9901 uuid " \
                  "550e8400-e29b-41d4-a716-446655440000 icon@2x.png "
    hostile = near_misses * (900_000 // len(near_misses))  # under the fake upstream's 1 MB body cap
    config = guarded(
        make_config([upstream.url]),
        rail("pii", "block"),
        rail("evil", "block", type="regex", patterns=MappingProxyType({"evil": r"(a+)+$"})),
    )
    gateway = await start_gateway(config)
    client = gateway.client()
    big = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": hostile}])
    backtracking = client.chat.completions.create(model="gpt-test", messages=[
        {"role": "user", "content": "a" * 1_000_000 + "b"}, {"role": "user", "content": EMAIL}])
    other = gateway.client("sk-test-team-b").chat.completions.create(
        model="same-name", messages=[{"role": "user", "content": "hi"}])
    big_done, blocked, other_done = await asyncio.gather(big, backtracking, other, return_exceptions=True)
    assert not isinstance(big_done, BaseException) and not isinstance(other_done, BaseException)
    assert big_done.choices[0].message.content == "Hello there", "no false positive in 1 MB of near-misses"
    assert other_done.choices[0].message.content == "Hello there"
    assert isinstance(blocked, openai.BadRequestError) and isinstance(blocked.body, dict)
    assert blocked.body["guardrail_key"] == "pii", "the 1 MB for (a+)+$ was scanned, then the e-mail blocked"
    with pytest.raises(openai.BadRequestError) as raised:
        await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "a" * 1_000_000}])
    assert isinstance(raised.value.body, dict) and raised.value.body["guardrail_key"] == "evil"
