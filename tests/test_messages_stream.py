"""OpenAI chunk stream → Anthropic Messages events (reference §7.6; B25, B27, B28), checked with
the anthropic SDK's own event types and accumulator."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from proxy.messages_stream import MessagesStream, MessagesStreamError, error_event

EVENT = TypeAdapter(RawMessageStreamEvent)


def chunk(delta: dict[str, Any] | None = None, finish: Any = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x"}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body.update(extra)
    return b"data: " + orjson.dumps(body) + b"\n\n"


def call(index: int, *, id: str | None = None, name: str | None = None, args: str | None = None) -> dict[str, Any]:
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    out: dict[str, Any] = {"index": index, "function": function}
    if id is not None:
        out.update(id=id, type="function")
    return out


USAGE = {"prompt_tokens": 1000, "completion_tokens": 40, "total_tokens": 1040, "prompt_tokens_details": {"cached_tokens": 900}}
RECORDED = b"".join([
    chunk({"role": "assistant", "content": ""}),
    chunk({"reasoning_content": "Two cities"}),
    chunk({"reasoning_content": ", two calls."}),
    chunk({"content": "Checking "}),
    chunk({"content": "both."}),
    chunk({"tool_calls": [call(0, id="call_a", name="get_weather", args="")]}),
    chunk({"tool_calls": [call(1, id="call_b", name="get_weather", args='{"ci')]}),
    chunk({"tool_calls": [call(0, args='{"city":')]}),
    chunk({"tool_calls": [call(1, args='ty":"Rome"}')]}),
    chunk({"tool_calls": [call(0, args='"Paris"}')]}),
    chunk({}, finish="tool_calls"),
    chunk(None, usage=USAGE),
    b"data: [DONE]\n\n",
])


def events(raw: bytes) -> list[dict[str, Any]]:
    """Each event checked for its `event:` line (B28) and against the SDK's event union."""
    out = []
    for block in raw.split(b"\n\n"):
        if not block:
            continue
        name, data = block.split(b"\n")
        payload = orjson.loads(data.removeprefix(b"data: "))
        assert name == b"event: " + payload["type"].encode()
        EVENT.validate_python(payload)
        out.append(payload)
    return out


def final_message(raw: bytes) -> Message:
    snapshot = None
    buffers: dict[int, bytes] = {}  # the SDK's partial-JSON buffers, one per tool block
    for payload in events(raw):
        snapshot = accumulate_event(event=EVENT.validate_python(payload), current_snapshot=snapshot, json_bufs=buffers)
    assert snapshot is not None
    return Message.model_validate(snapshot.model_dump())


def stream(**kwargs: Any) -> MessagesStream:
    return MessagesStream(model="claude-sonnet-4-6", tool_names=kwargs.pop("tool_names", {}), input_tokens=kwargs.pop("input_tokens", 42))


def run(raw: bytes, **kwargs: Any) -> bytes:
    converter = stream(**kwargs)
    out = converter.feed(raw)
    assert converter.done
    return out


def test_recorded_stream_through_the_sdk_accumulator() -> None:
    message = final_message(run(RECORDED))
    kinds = [block.type for block in message.content]
    assert kinds == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "Two cities, two calls."  # type: ignore[union-attr]
    assert message.content[1].text == "Checking both."  # type: ignore[union-attr]
    assert message.model == "claude-sonnet-4-6" and message.id == "msg_chatcmpl-1"
    assert message.stop_reason == "tool_use"


def test_b27_interleaved_parallel_tool_deltas_reach_their_own_blocks() -> None:
    message = final_message(run(RECORDED))
    calls = [(b.id, b.input) for b in message.content if b.type == "tool_use"]
    assert calls == [("call_a", {"city": "Paris"}), ("call_b", {"city": "Rome"})]


def test_b25_stream_usage_has_cache_reads_apart() -> None:
    converter = stream()
    out = events(converter.feed(RECORDED))
    assert out[0]["message"]["usage"] == {"input_tokens": 42, "output_tokens": 0}
    assert out[-2]["type"] == "message_delta"
    assert out[-2]["usage"] == {"input_tokens": 100, "output_tokens": 40, "cache_read_input_tokens": 900,
                                "cache_creation_input_tokens": 0}
    assert out[-1] == {"type": "message_stop"}
    assert converter.usage == USAGE


def test_every_split_gives_the_same_output() -> None:
    whole = run(RECORDED)
    for cut in range(1, len(RECORDED)):
        converter = stream()
        assert converter.feed(RECORDED[:cut]) + converter.feed(RECORDED[cut:]) == whole, cut
    converter = stream()
    assert b"".join(converter.feed(RECORDED[i : i + 1]) for i in range(len(RECORDED))) == whole


def test_crlf_framing_and_comments() -> None:
    raw = b": keepalive\r\n\r\n" + RECORDED.replace(b"\n\n", b"\r\n\r\n")
    assert run(raw) == run(RECORDED)


def test_nothing_is_sent_before_the_first_content_so_an_error_can_fail_over() -> None:
    converter = stream()
    assert converter.feed(chunk({"role": "assistant", "content": ""})) == b""
    assert converter.feed(chunk({"tool_calls": [call(0, args="{")]})) == b""  # no name yet: buffered
    with pytest.raises(MessagesStreamError) as caught:
        converter.feed(b'data: {"error":{"message":"overloaded","type":"server_error"}}\n\n')
    assert caught.value.error["type"] == "server_error" and not converter.committed


def test_first_content_commits_with_message_start() -> None:
    converter = stream()
    converter.feed(chunk({"role": "assistant", "content": ""}))
    out = events(converter.feed(chunk({"content": "hi"})))
    assert [e["type"] for e in out] == ["message_start", "content_block_start", "content_block_delta"]
    assert converter.committed


def test_done_without_a_finish_reason_is_a_cut() -> None:
    converter = stream()
    converter.feed(chunk({"content": "partial"}))
    with pytest.raises(ValueError):
        converter.feed(b"data: [DONE]\n\n")
    assert not converter.done


def test_eof_after_a_finish_reason_ends_cleanly() -> None:
    converter = stream()
    out = converter.feed(chunk({"content": "a"}) + chunk({}, finish="stop"))
    out += converter.close()
    assert converter.done and final_message(out).stop_reason == "end_turn"
    with pytest.raises(ValueError):
        stream().close()


TERMINALS = [
    ("stop", "end_turn"),
    ("length", "max_tokens"),
    ("content_filter", "refusal"),
    ("tool_calls", "tool_use"),
    ("mystery", "end_turn"),
]


@pytest.mark.parametrize("finish, stop", TERMINALS)
def test_stop_reasons(finish: str, stop: str) -> None:
    out = run(chunk({"content": "x"}) + chunk({}, finish=finish) + b"data: [DONE]\n\n")
    assert final_message(out).stop_reason == stop


def test_no_content_at_all_is_still_a_whole_message() -> None:
    out = events(run(chunk({"role": "assistant"}) + chunk({}, finish="stop") + b"data: [DONE]\n\n"))
    assert [e["type"] for e in out] == ["message_start", "message_delta", "message_stop"]
    assert out[1]["usage"]["input_tokens"] == 42  # no usage chunk: the estimate stands


def test_tool_without_arguments_gets_an_empty_object_and_its_restored_name() -> None:
    long = "n" * 100
    raw = chunk({"tool_calls": [call(0, id="functions.Bash:0", name="short_1")]}) + chunk({}, finish="tool_calls")
    message = final_message(run(raw + b"data: [DONE]\n\n", tool_names={"short_1": long}))
    block = message.content[0]
    assert block.type == "tool_use" and block.input == {} and block.name == long
    assert block.id.startswith("functions_Bash_0_")


def test_text_after_an_open_tool_lands_in_a_later_block() -> None:
    raw = b"".join([
        chunk({"tool_calls": [call(0, id="c1", name="f", args='{"a":')]}),
        chunk({"content": "late"}),
        chunk({"tool_calls": [call(0, args="1}")]}),
        chunk({}, finish="tool_calls"), b"data: [DONE]\n\n",
    ])
    message = final_message(run(raw))
    assert [b.type for b in message.content] == ["tool_use", "text"]
    assert message.content[0].input == {"a": 1}  # type: ignore[union-attr]


@pytest.mark.parametrize("raw", [b"data: [1]\n\n", b'data: {"id":"x"}\n\n', b"data: {bad\n\n",
                                 chunk({"tool_calls": [{"index": "0"}]})])
def test_malformed_chunks_are_value_errors(raw: bytes) -> None:
    with pytest.raises(ValueError):
        stream().feed(raw)


def test_error_event_shape() -> None:
    name, data = error_event("overloaded_error", "busy").rstrip(b"\n").split(b"\n")
    assert name == b"event: error"
    assert orjson.loads(data[6:]) == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
