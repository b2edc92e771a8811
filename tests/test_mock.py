"""The built-in `mock` provider, served from the shipped demo config through the openai SDK."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
