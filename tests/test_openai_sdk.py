"""The official openai SDK against the gateway: happy paths and the error classes it maps."""

from __future__ import annotations

import openai
import orjson
import pytest

from .conftest import OTHER_KEY, Gateway, Upstream, sse_events, stream_handler

MESSAGES = [{"role": "user", "content": "Say hello"}]


async def test_chat_completion_round_trip(gateway: Gateway, upstream: Upstream) -> None:
    client = gateway.client()
    completion = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello there"
    assert completion.usage is not None and completion.usage.total_tokens == 7
    sent = upstream.requests[0]
    assert sent["path"] == "/v1/chat/completions"
    assert orjson.loads(sent["body"])["model"] == "upstream-model"
    assert sent["headers"]["authorization"] == "Bearer sk-upstream-0"


async def test_streaming_round_trip_strips_usage_the_client_did_not_ask_for(
    gateway: Gateway, upstream: Upstream
) -> None:
    upstream.handler = stream_handler(sse_events(["Hel", "lo"]))
    stream = await gateway.client().chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    assert all(c.choices for c in chunks), "the usage-only chunk must not reach the client"
    sent = orjson.loads(upstream.requests[0]["body"])
    assert sent["stream_options"] == {"include_usage": True}


async def test_streaming_usage_relayed_when_asked(gateway: Gateway, upstream: Upstream) -> None:
    upstream.handler = stream_handler(sse_events(["Hi"], usage=(11, 1)))
    stream = await gateway.client().chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 11


@pytest.mark.parametrize(
    ("kwargs", "key", "error", "status"),
    [
        ({"model": "gpt-test"}, "sk-wrong", openai.AuthenticationError, 401),
        ({"model": "nope"}, None, openai.NotFoundError, 404),
        ({"model": "gpt-test"}, OTHER_KEY, openai.PermissionDeniedError, 403),
        ({"model": "embed"}, None, openai.UnprocessableEntityError, 422),
        ({"model": "gpt-test", "temperature": 3}, None, openai.BadRequestError, 400),
    ],
)
async def test_error_classes(
    gateway: Gateway, upstream: Upstream, kwargs: dict, key: str | None, error: type, status: int
) -> None:
    client = gateway.client(key) if key else gateway.client()
    with pytest.raises(error) as raised:
        await client.chat.completions.create(messages=MESSAGES, **kwargs)
    assert raised.value.status_code == status
    assert upstream.requests == []


async def test_bad_request_names_param(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        await gateway.client().chat.completions.create(
            model="gpt-test", messages=MESSAGES, top_p=1.5
        )
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["param"] == "top_p" and body["code"] == "invalid_value"


async def test_models_lists_only_allowed(gateway: Gateway) -> None:
    page = await gateway.client(OTHER_KEY).models.list()
    assert [m.id for m in page.data] == ["same-name"]
    everything = await gateway.client().models.list()
    assert {m.id for m in everything.data} == {"gpt-test", "same-name", "embed"}
