"""Where guardrails look and how they rewrite, as pure functions for both client APIs: request
texts and their locations, redacted bodies, JSON answers, and streams split at every position."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.config import GuardrailConfig
from proxy.guardrails.extract import answer_segments, request_segments
from proxy.guardrails.redact import redact_text, with_texts
from proxy.guardrails.rules import Guardrail, Scan
from proxy.guardrails.detectors import Match
from proxy.guardrails.stage import redactions
from proxy.guardrails.stream import GuardedStream
from proxy.providers.anthropic_passthrough import MessagesRelay
from proxy.upstream import InBandError
from proxy.faults import Fault
from proxy.streaming import SseScanner, event_end, event_json

EMAIL = "john.doe@example.com"
CHAT_REQUEST: dict[str, Any] = {
    "model": "gpt-test",
    "messages": [
        {"role": "system", "content": "You help. Escalate to ops@example.com"},
        {"role": "user", "content": f"My mail is {EMAIL}", "name": "a@example.com"},
        {"role": "user", "content": [
            {"type": "text", "text": "card 4111 1111 1111 1111"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,a@example.com"}},
        ]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a@example.com", "type": "function",
             "function": {"name": "send", "arguments": '{"to": "x@example.com", "card": 4111111111111111}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sent to 203.0.113.7"},
    ],
}
MESSAGES_REQUEST: dict[str, Any] = {
    "model": "claude",
    "max_tokens": 10,
    "system": [{"type": "text", "text": "Ops: ops@example.com"}],
    "messages": [
        {"role": "user", "content": f"I am {EMAIL}"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "a@example.com", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_a@example.com", "name": "lookup",
             "input": {"email@example.com": "b@example.com", "n": [1, "203.0.113.7"]}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": "4111111111111111"}]},
            {"type": "tool_result", "tool_use_id": "u", "content": "c@example.com"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "a@example.com"}},
        ]},
    ],
}


def scan_of(action: str = "redact", **config: Any) -> Scan:
    return Scan([Guardrail(GuardrailConfig(name="pii", action=action, **config))])


def findings(api: str, data: dict[str, Any]) -> list[tuple[str, str]]:
    segments = request_segments(api, data)
    hits = scan_of().hits([s.text.encode() for s in segments])
    return [(h.match.category, segments[h.text].location) for h in sorted(hits, key=lambda h: h.text)]


def test_chat_request_texts_and_locations() -> None:
    assert findings("chat", CHAT_REQUEST) == [
        ("email", "messages[0].content"),
        ("email", "messages[1].content"),
        ("credit_card", "messages[2].content[0].text"),
        ("email", "messages[3].tool_calls[0].function.arguments"),
        ("credit_card", "messages[3].tool_calls[0].function.arguments"),
        ("ip_address", "messages[4].content"),
    ]


def test_messages_request_texts_and_locations() -> None:
    assert findings("messages", MESSAGES_REQUEST) == [
        ("email", "system[0].text"),
        ("email", "messages[0].content"),
        ("email", "messages[1].content[1].input"),
        ("ip_address", "messages[1].content[1].input"),
        ("credit_card", "messages[2].content[0].content[0].text"),
        ("email", "messages[2].content[1].content"),
    ]


def test_messages_system_as_a_string() -> None:
    assert findings("messages", {"system": EMAIL, "messages": []}) == [("email", "system")]


def redacted(api: str, data: dict[str, Any]) -> dict[str, Any]:
    segments = request_segments(api, data)
    texts = [s.text.encode() for s in segments]
    return with_texts(data, redactions(scan_of().hits(texts), segments, texts))


def test_chat_request_redacted_only_where_matched() -> None:
    before = orjson.dumps(CHAT_REQUEST)
    result = redacted("chat", CHAT_REQUEST)
    assert orjson.dumps(CHAT_REQUEST) == before, "the client's parsed body is not changed"
    messages = result["messages"]
    assert messages[1] == {"role": "user", "content": "My mail is [REDACTED:EMAIL]", "name": "a@example.com"}
    assert messages[2]["content"][0]["text"] == "card [REDACTED:CREDIT_CARD]"
    assert messages[2]["content"][1] is CHAT_REQUEST["messages"][2]["content"][1]
    arguments = messages[3]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(arguments) == {"to": "[REDACTED:EMAIL]", "card": "[REDACTED:CREDIT_CARD]"}
    assert messages[3]["tool_calls"][0]["id"] == "call_a@example.com"
    assert messages[4]["content"] == "sent to [REDACTED:IP_ADDRESS]"


def test_messages_request_redacted_only_where_matched() -> None:
    result = redacted("messages", MESSAGES_REQUEST)
    assert result["system"][0]["text"] == "Ops: [REDACTED:EMAIL]"
    tool_use = result["messages"][1]["content"][1]
    assert tool_use["input"] == {"email@example.com": "[REDACTED:EMAIL]", "n": [1, "[REDACTED:IP_ADDRESS]"]}
    assert tool_use["id"] == "toolu_a@example.com"
    assert result["messages"][1]["content"][0]["thinking"] == "a@example.com"
    assert result["messages"][2]["content"][1]["content"] == "[REDACTED:EMAIL]"
    assert result["messages"][2]["content"][2]["source"]["data"] == "a@example.com"


def test_overlapping_matches_become_one_marker() -> None:
    text = b"id EMP-123456 here"
    assert redact_text(text, [Match("a", 3, 13), Match("b", 7, 13)]) == "id [REDACTED:A] here"


def test_regex_guardrail_patterns() -> None:
    scan = scan_of(type="regex", patterns={"employee_id": r"EMP-\d{6}"})
    segments = request_segments("chat", {"messages": [{"role": "user", "content": "ask EMP-123456 or EMP-12"}]})
    texts = [s.text.encode() for s in segments]
    hits = scan.hits(texts)
    assert [(h.match.category, h.match.start, h.match.end) for h in hits] == [("employee_id", 4, 14)]
    assert with_texts({"messages": [{"content": ""}]}, redactions(hits, segments, texts)) == {
        "messages": [{"content": "ask [REDACTED:EMPLOYEE_ID] or EMP-12"}]
    }


def test_answer_texts_of_both_apis() -> None:
    chat = {"choices": [{"index": 0, "message": {"role": "assistant", "content": EMAIL, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}]}}]}
    assert [s.location for s in answer_segments("chat", chat)] == [
        "choices[0].message.content", "choices[0].message.tool_calls[0].function.arguments",
    ]
    anthropic = {"content": [{"type": "text", "text": EMAIL}, {"type": "tool_use", "id": "t", "name": "f",
                                                             "input": {"q": "y"}}]}
    assert [s.location for s in answer_segments("messages", anthropic)] == ["content[0].text", "content[1].input"]


# Streams: the client's text, event by event, split at every position of a match.

def chat_event(text: str | None = None, finish: str | None = None, tool: tuple[int, str] | None = None) -> bytes:
    delta: dict[str, Any] = {} if text is None else {"content": text}
    if tool is not None:  # (index, argument piece) of a streamed tool call
        delta["tool_calls"] = [{"index": tool[0], "function": {"arguments": tool[1]}}]
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def messages_event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\n".encode() + b"data: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


def text_delta(text: str) -> bytes:
    return messages_event("content_block_delta", index=0, delta={"type": "text_delta", "text": text})


def relay(api: str, events: list[bytes], action: str = "redact") -> tuple[bytes, list[str]]:
    counted: list[str] = []
    stream = GuardedStream(SseScanner(strip_usage=False), scan_of(action), api,
                           lambda hits: counted.extend(h.match.category for h in hits))
    return b"".join(stream.feed(event) for event in events), counted


def events_of(data: bytes) -> list[bytes]:
    out, start = [], 0
    while start < len(data):
        end = event_end(data, start, len(data))
        out.append(data[start:end])
        start = end
    return out


def chat_text(data: bytes) -> str:
    text = ""
    for event in events_of(data):
        assert event.endswith(b"\n\n")
        value = event_json(event)
        if value is not None:
            assert value["object"] == "chat.completion.chunk"
            text += value["choices"][0]["delta"].get("content") or ""
    return text


def messages_text(data: bytes) -> str:
    text = ""
    for event in events_of(data):
        lines = event.split(b"\n")
        value = event_json(event)
        assert lines[0] == b"event: " + value["type"].encode(), "each event keeps its event: line"
        if value["type"] == "content_block_delta":
            text += value["delta"]["text"]
    return text


SENTENCE = f"Sure, write to {EMAIL} or call +1 415 555 2671 today."
EXPECTED = "Sure, write to [REDACTED:EMAIL] or call [REDACTED:PHONE] today."


@pytest.mark.parametrize("cut", range(1, len(SENTENCE)))
def test_chat_stream_split_at_every_position(cut: int) -> None:
    events = [chat_event(SENTENCE[:cut]), chat_event(SENTENCE[cut:]), chat_event(finish="stop"), b"data: [DONE]\n\n"]
    out, counted = relay("chat", events)
    assert chat_text(out) == EXPECTED
    assert EMAIL.encode() not in out and b"2671" not in out
    assert sorted(counted) == ["email", "phone"]
    assert out.endswith(chat_event(finish="stop") + b"data: [DONE]\n\n"), "end events pass as sent"


@pytest.mark.parametrize("cut", range(1, len(SENTENCE)))
def test_messages_stream_split_at_every_position(cut: int) -> None:
    events = [
        messages_event("message_start", message={"id": "m", "content": []}),
        messages_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        text_delta(SENTENCE[:cut]), text_delta(SENTENCE[cut:]),
        messages_event("content_block_stop", index=0),
        messages_event("message_stop"),
    ]
    out, counted = relay("messages", events)
    assert messages_text(out) == EXPECTED
    assert EMAIL.encode() not in out
    assert sorted(counted) == ["email", "phone"]


def test_stream_one_character_per_event() -> None:
    events = [chat_event(char) for char in SENTENCE] + [chat_event(finish="stop"), b"data: [DONE]\n\n"]
    out, _ = relay("chat", events)
    assert chat_text(out) == EXPECTED
    assert len(events_of(out)) == len(events), "no event added or lost"


def test_stream_without_findings_relays_the_same_bytes() -> None:
    events = [chat_event(word) for word in "nothing to see here, friend".split(" ")]
    events += [chat_event(finish="stop"), b"data: [DONE]\n\n"]
    out, counted = relay("chat", events)
    assert out == b"".join(events) and counted == []


def test_stream_holds_back_only_the_tail() -> None:
    stream = GuardedStream(SseScanner(strip_usage=False), scan_of(), "chat", lambda hits: None)
    first = chat_event("x" * 100)
    assert stream.feed(first) == b"", "the last 64 bytes of a channel wait for what follows"
    assert stream.feed(chat_event("y" * 64)) == first
    assert stream.feed(chat_event(finish="stop")) != b""


def test_log_action_counts_and_changes_nothing() -> None:
    events = [chat_event(SENTENCE[:20]), chat_event(SENTENCE[20:]), chat_event(finish="stop"), b"data: [DONE]\n\n"]
    out, counted = relay("chat", events, action="log")
    assert out == b"".join(events)
    assert sorted(counted) == ["email", "phone"]


async def test_a_passed_through_error_event_releases_redacted_text() -> None:
    """A pass-through relays the upstream's `event: error` with what came before it: that text is
    redacted too, and what the hold-back kept leaves before the error."""
    counted: list[str] = []
    stream = GuardedStream(MessagesRelay(), scan_of(), "messages", lambda hits: counted.extend(h.match.category for h in hits))
    start = messages_event("message_start", message={"id": "m", "usage": {"input_tokens": 3, "output_tokens": 1}})
    block = messages_event("content_block_start", index=0, content_block={"type": "text", "text": ""})
    first = stream.feed(start + block + text_delta("Write to "))
    error = messages_event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    with pytest.raises(InBandError) as raised:
        stream.feed(text_delta("john.d") + text_delta("oe@example.com now") + error)
    assert raised.value.verdict.fault is Fault.TRANSIENT
    relayed = first + raised.value.tail
    assert EMAIL.encode() not in relayed and b"john.d" not in relayed
    assert messages_text(relayed.rsplit(b"event: error", 1)[0]) == "Write to [REDACTED:EMAIL] now"
    assert relayed.endswith(error) and counted == ["email"]


TOOL_INPUT = '{"note": "card \\"4111 1111 1111 1111\\" on file", "card": 4111111111111111, "tz": "UTC"}'


def json_delta(text: str) -> bytes:
    return messages_event("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": text})


@pytest.mark.parametrize("cut", range(1, len(TOOL_INPUT), 3))
def test_streamed_tool_input_stays_json_when_a_number_is_redacted(cut: int) -> None:
    """A match outside the JSON text's strings (a number) becomes a quoted marker in a stream
    too, wherever the pieces are cut: the client's accumulated input still parses."""
    pieces = [TOOL_INPUT[:cut], TOOL_INPUT[cut:]]
    events = [
        messages_event("content_block_start", index=0,
                       content_block={"type": "tool_use", "id": "toolu_1", "name": "pay", "input": {}}),
        *(json_delta(piece) for piece in pieces),
        messages_event("content_block_stop", index=0),
    ]
    out, counted = relay("messages", events)
    streamed = "".join(orjson.loads(e.partition(b"\ndata: ")[2])["delta"]["partial_json"]
                       for e in events_of(out) if e.startswith(b"event: content_block_delta"))
    assert orjson.loads(streamed) == {
        "note": 'card "[REDACTED:CREDIT_CARD]" on file', "card": "[REDACTED:CREDIT_CARD]", "tz": "UTC"}
    assert counted == ["credit_card", "credit_card"]
    calls = [chat_event(None, tool=(0, piece)) for piece in pieces] + [chat_event(finish="tool_calls"), b"data: [DONE]\n\n"]
    out, _ = relay("chat", calls)
    arguments = "".join(
        call["function"].get("arguments", "") for e in events_of(out) if (value := event_json(e)) is not None
        for call in value["choices"][0]["delta"].get("tool_calls", [])
    )
    assert orjson.loads(arguments)["card"] == "[REDACTED:CREDIT_CARD]"
