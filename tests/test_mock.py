"""The built-in `mock` provider, served from the shipped demo config through the openai and anthropic SDKs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic

from proxy.configfile import load_config

DEMO = Path(__file__).resolve().parent.parent / "deploy" / "demo.yaml"
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "echo these four words"}]


async def test_demo_config_answers_json_and_streams(start_gateway: Any) -> None:
    gateway = await start_gateway(load_config(str(DEMO)))
    client = gateway.client("sk-demo")
    completion = await client.chat.completions.create(model="demo-chat", messages=MESSAGES)
    assert completion.choices[0].message.content == "echo these four words"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    words = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert words == ["echo", " these", " four", " words"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


async def test_mock_honours_n_and_max_tokens(start_gateway: Any) -> None:
    gateway = await start_gateway(load_config(str(DEMO)))
    client = gateway.client("sk-demo")
    completion = await client.chat.completions.create(model="demo-chat", messages=MESSAGES, n=3, max_tokens=2)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (i, "echo these", "length") for i in range(3)
    ]
    assert completion.usage is not None and completion.usage.completion_tokens == 6
    stream = await client.chat.completions.create(
        model="demo-chat", messages=MESSAGES, n=2, max_completion_tokens=3, stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finishes: list[str | None] = [None, None]
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == ["echo these four"] * 2 and finishes == ["length", "length"]
    assert usage is not None and usage.completion_tokens == 6
    whole = await client.chat.completions.create(model="demo-chat", messages=MESSAGES, max_tokens=100)
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == ("echo these four words", "stop")


async def test_demo_config_serves_the_anthropic_sdk(start_gateway: Any) -> None:
    """/v1/messages on the demo: passed through to the mock imitating Anthropic, converted to the
    OpenAI-speaking one; the same words either way."""
    gateway = await start_gateway(load_config(str(DEMO)))
    async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key="sk-demo", max_retries=0) as client:
        for model in ("claude-demo", "demo-chat"):
            message = await client.messages.create(
                model=model, max_tokens=100, system="be brief",
                messages=[{"role": "user", "content": "echo these four words"}],
            )
            assert message.content[0].text == "echo these four words", model  # type: ignore[union-attr]
            assert message.usage.output_tokens == 4
            async with client.messages.stream(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "echo these four words"}]
            ) as stream:
                words = [text async for text in stream.text_stream]
                final = await stream.get_final_message()
            assert words == ["echo", " these"] and final.stop_reason == "max_tokens", model
            count = await client.messages.count_tokens(model=model, messages=[{"role": "user", "content": "hi"}])
            assert count.input_tokens > 0
