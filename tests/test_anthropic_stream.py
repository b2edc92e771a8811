"""AnthropicStream on recorded transcripts: any split gives the same bytes, the held role chunk,
tool-call ordinals, the terminal sequence, usage, in-band errors and cuts (reference §3, §8)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from proxy.providers import anthropic_stream
from proxy.providers.anthropic_answer import from_anthropic
from proxy.providers.anthropic_stream import AnthropicStream, AnthropicStreamError

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
TEXT = (FIXTURES / "text.sse").read_bytes()
TOOLS = (FIXTURES / "tools_thinking.sse").read_bytes()
OVERLOADED = (FIXTURES / "overloaded_after_start.sse").read_bytes()


def sse(event: dict[str, Any]) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


START = sse({"type": "message_start", "message": {"id": "msg_9", "model": "claude-x", "usage": {"input_tokens": 3, "output_tokens": 1}}})
STOP = sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}) + sse({"type": "message_stop"})


def text_events(index: int, text: str) -> bytes:
    return (
        sse({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})
        + sse({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})
        + sse({"type": "content_block_stop", "index": index})
    )


def run(pieces: list[bytes], *, include_usage: bool = True, json_mode: bool = False) -> tuple[bytes, AnthropicStream]:
    stream = AnthropicStream(include_usage=include_usage, created=1700000000, json_mode=json_mode)
    return b"".join(stream.feed(piece) for piece in pieces), stream


def events(out: bytes) -> list[bytes]:
    return [event[6:] for event in out.split(b"\n\n") if event]


def chunks(out: bytes) -> list[ChatCompletionChunk]:
    """Every chunk, parsed by the openai SDK's own type; the stream ends with exactly one [DONE]."""
    payloads = events(out)
    assert payloads[-1] == b"[DONE]" and b"[DONE]" not in payloads[:-1]
    return [ChatCompletionChunk.model_validate_json(payload) for payload in payloads[:-1]]


VARIANTS = {
    "LF": TEXT,
    "CRLF": TEXT.replace(b"\n", b"\r\n"),
    "comments and multi-line data": TEXT.replace(b"event: ping\n", b": keep-alive\n\nevent: ping\n").replace(
        b'"delta":{"type":"text_delta"', b'"delta":\ndata: {"type":"text_delta"'
    ),
    "data-only lines, no event:": b"\n".join(line for line in TEXT.split(b"\n") if not line.startswith(b"event:")),
}


@pytest.mark.parametrize("raw", VARIANTS.values(), ids=VARIANTS.keys())
def test_a_small_transcript_split_at_every_byte_gives_identical_output(raw: bytes) -> None:
    whole, stream = run([raw])
    assert stream.done and whole == run([TEXT])[0]
    for at in range(len(raw) + 1):
        assert run([raw[:at], raw[at:]])[0] == whole, at
    assert run([raw[i : i + 1] for i in range(len(raw))])[0] == whole


def test_a_large_transcript_split_anywhere_in_two_or_three_gives_identical_output() -> None:
    whole = run([TOOLS])[0]
    for at in range(len(TOOLS) + 1):
        assert run([TOOLS[:at], TOOLS[at:]])[0] == whole, at
    for first in range(0, len(TOOLS), 97):
        for second in range(first, len(TOOLS) + 1, 89):
            assert run([TOOLS[:first], TOOLS[first:second], TOOLS[second:]])[0] == whole, (first, second)


def test_b1_b2_b3_tool_calls_indexed_per_call_after_thinking_and_text() -> None:
    out, stream = run([TOOLS])
    parsed = chunks(out)
    assert all(chunk.choices[0].index == 0 for chunk in parsed if chunk.choices)  # B2
    indices = [call.index for chunk in parsed if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
    assert sorted(set(indices)) == [0, 1]  # B1: the Anthropic blocks were 2 and 3
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState()
    for chunk in parsed:
        state.handle_chunk(chunk)
    message = state.get_final_completion().choices[0].message
    calls = message.tool_calls or []
    assert [(call.id, call.function.name) for call in calls] == [
        ("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"), ("toolu_01Hn8mRd2YbwY8zPjSTj5Vkx", "get_time")
    ]
    assert [orjson.loads(call.function.arguments) for call in calls] == [{"city": "Paris", "unit": "c"}, {}]  # B3
    assert message.content == "Let me check both."
    assert state.get_final_completion().choices[0].finish_reason == "tool_calls"


def test_thinking_streams_as_reasoning_content() -> None:
    reasoning = [orjson.loads(e)["choices"][0]["delta"].get("reasoning_content") for e in events(run([TOOLS])[0])[:-2]]
    assert "".join(r for r in reasoning if r) == "The user wants the weather in Paris, and the time."


def test_b4_usage_streamed_equals_usage_unstreamed() -> None:
    for name in ("text", "tools_thinking"):
        out, stream = run([(FIXTURES / f"{name}.sse").read_bytes()])
        answer = from_anthropic((FIXTURES / f"{name}.json").read_bytes(), created=1)
        usage_chunk = chunks(out)[-1]
        assert usage_chunk.usage is not None
        assert usage_chunk.usage.model_dump(exclude_none=True) == answer.usage == stream.usage
    assert stream.usage is not None and stream.usage["prompt_tokens"] == 472 + 2048 + 100


def test_b6_one_usage_chunk_right_before_done_only_when_asked() -> None:
    out, _ = run([TOOLS], include_usage=True)
    parsed = chunks(out)
    assert [chunk.choices == [] for chunk in parsed].count(True) == 1 and parsed[-1].choices == []
    assert parsed[-2].choices[0].finish_reason == "tool_calls" and parsed[-2].usage is None
    assert all(b'"usage":null' in event for event in events(out)[:-2])
    out, stream = run([TOOLS], include_usage=False)
    assert all(chunk.choices for chunk in chunks(out)) and b'"usage"' not in out
    assert stream.usage is not None  # still known, for settlement


def test_the_role_chunk_and_ping_are_held_until_content() -> None:
    stream = AnthropicStream(include_usage=False, created=1)
    assert stream.feed(START + sse({"type": "ping"})) == b""
    assert not stream.committed and stream.usage is not None and stream.usage["prompt_tokens"] == 3
    out = stream.feed(text_events(0, "Hi"))
    assert [orjson.loads(e)["choices"][0]["delta"] for e in events(out)] == [{"role": "assistant", "content": ""}, {"content": "Hi"}]
    assert stream.committed


@pytest.mark.parametrize("at", range(len(OVERLOADED) + 1))
def test_b7_b30_an_error_right_after_message_start_shows_the_client_nothing(at: int) -> None:
    stream = AnthropicStream(include_usage=True, created=1)
    with pytest.raises(AnthropicStreamError) as caught:
        assert stream.feed(OVERLOADED[:at]) == b""
        stream.feed(OVERLOADED[at:])
    assert (caught.value.verdict_status, caught.value.error_type, caught.value.message) == (529, "overloaded_error", "Overloaded")
    assert not stream.committed and not stream.done


def test_b7_an_error_after_content_raises_with_the_stream_committed() -> None:
    stream = AnthropicStream(include_usage=False, created=1)
    assert stream.feed(START + text_events(0, "partial"))
    error = sse({"type": "error", "error": {"type": "api_error", "message": "Internal"}})
    with pytest.raises(AnthropicStreamError) as caught:
        stream.feed(error)
    assert caught.value.verdict_status == 500 and stream.committed and not stream.done
    assert orjson.loads(caught.value.body()) == {"type": "error", "error": {"type": "api_error", "message": "Internal"}}


def test_an_error_in_the_same_feed_as_the_first_content_discards_that_content() -> None:
    stream = AnthropicStream(include_usage=False, created=1)
    with pytest.raises(AnthropicStreamError):
        stream.feed(START + text_events(0, "never seen") + sse({"type": "error", "error": {"type": "overloaded_error"}}))
    assert not stream.committed  # nothing was returned: the request may still fail over


def test_b8_a_stream_cut_before_message_stop_is_not_done_and_keeps_its_usage() -> None:
    cut = TEXT[: TEXT.index(b"event: message_stop")]
    out, stream = run([cut])
    assert not stream.done and b"[DONE]" not in out and b"finish_reason\":\"stop" not in out
    assert stream.usage is not None and stream.usage["completion_tokens"] == 2  # billed as far as seen


def test_message_delta_usage_is_cumulative_the_latest_wins() -> None:
    deltas = (
        sse({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 10, "cache_read_input_tokens": 7}})
        + sse({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 25, "input_tokens": 5}})
    )
    out, stream = run([START + text_events(0, "x") + deltas + sse({"type": "message_stop"})])
    assert stream.usage == {"prompt_tokens": 12, "completion_tokens": 25, "total_tokens": 37,
                            "prompt_tokens_details": {"cached_tokens": 7, "cache_write_tokens": 0}}
    assert chunks(out)[-2].choices[0].finish_reason == "length"


def test_unknown_events_blocks_and_stop_reasons_map_to_defaults_and_are_recorded() -> None:
    server_tool = {"type": "content_block_start", "index": 0, "content_block": {"type": "server_tool_use", "id": "s", "name": "web_search"}}
    raw = (START + sse({"type": "future_event", "x": 1}) + sse(server_tool) + sse({"type": "content_block_stop", "index": 0})
           + text_events(1, "ok") + sse({"type": "message_delta", "delta": {"stop_reason": "brand_new"}, "usage": {"output_tokens": 2}})
           + sse({"type": "message_stop"}))
    out, stream = run([raw])
    assert chunks(out)[-2].choices[0].finish_reason == "stop"
    assert stream.unknown == [("stop_reason", "brand_new")] and stream.dropped_blocks == ["server_tool_use"]


def test_a_message_without_content_still_ends_with_role_finish_usage_and_done() -> None:
    out, stream = run([START + STOP])
    parsed = chunks(out)
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[1].choices[0].finish_reason == "stop"
    assert stream.done and stream.feed(text_events(0, "late")) == b""


def test_tool_use_without_a_tool_call_finishes_with_stop() -> None:
    stop = sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}) + sse({"type": "message_stop"})
    assert chunks(run([START + text_events(0, "x") + stop])[0])[-2].choices[0].finish_reason == "stop"


def test_json_mode_streams_the_forced_tool_input_as_content() -> None:
    tool = {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "t", "name": "json_tool_call", "input": {}}}
    parts = [sse({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": p}}) for p in ('{"a"', ": 1}")]
    tool_stop = sse({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 4}}) + sse({"type": "message_stop"})
    out, _ = run([START + sse(tool) + b"".join(parts) + sse({"type": "content_block_stop", "index": 0}) + tool_stop], json_mode=True)
    parsed = chunks(out)
    assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices) == '{"a": 1}'
    assert not any(c.choices[0].delta.tool_calls for c in parsed if c.choices)
    assert parsed[-2].choices[0].finish_reason == "stop"


MALFORMED = {
    "content before message_start": text_events(0, "x"),
    "not JSON": b"event: message_start\ndata: {nope\n\n",
    "an untyped event": b"data: [1, 2]\n\n",
    "message_start without id": sse({"type": "message_start", "message": {"model": "m"}}),
    "input for a text block": START + text_events(0, "x").replace(b'"text_delta","text":"x"', b'"input_json_delta","partial_json":"{"'),
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_stream_raises_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        run([raw])


def test_an_unfinished_event_may_reach_the_cap_and_no_further() -> None:
    cap = anthropic_stream.MAX_EVENT_BYTES
    stream = AnthropicStream(include_usage=False, created=1)
    stream.feed(b"data: " + b"y" * (cap - 6))
    with pytest.raises(ValueError, match="over 8388608 bytes"):
        stream.feed(b"y")
    with pytest.raises(ValueError, match="over 8388608 bytes"):
        AnthropicStream(include_usage=False, created=1).feed(b"data: " + b"y" * cap + b"\n\n")


def allocated_while_feeding(size: int, piece: int = 1024) -> int:
    """Bytes allocated at each feed's peak, summed over one text delta of `size` bytes fed in
    `piece`-byte chunks: a deterministic count of the copying the converter does."""
    event = sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x" * size}})
    pieces = [START + text_events(0, "a")] + [event[i : i + piece] for i in range(0, len(event), piece)]
    stream = AnthropicStream(include_usage=False, created=1)
    total = 0
    tracemalloc.start()
    try:
        for chunk in pieces:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = stream.feed(chunk)
            total += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert b"x" * size in out
    return total


def test_a_large_event_in_small_chunks_costs_work_linear_in_its_size() -> None:
    size = 256 * 1024
    small, large = allocated_while_feeding(size), allocated_while_feeding(4 * size)
    # a tail re-joined per chunk would copy size²/(2 × piece) bytes: 32 MiB here, 512 MiB at 4 × size;
    # orjson's own buffers take about 15 × an event each to parse and to encode it
    assert small <= 40 * size
    assert large <= 4.5 * small
