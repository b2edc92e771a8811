"""`MessagesRelay`, the reader of a passed-through Anthropic stream, fed bytes cut anywhere.

It must relay every event unchanged and in order, hold message_start and ping until the first
other event (the commit point), turn an `event: error` before it into a fail-over and after it
into the stream's end (the upstream's own event relayed), and settle on the usage of
message_start updated by message_delta's.
"""

from __future__ import annotations

import pytest

from proxy.config import ProviderConfig
from proxy.faults import Fault
from proxy.httpmessage import UpstreamFailure
from proxy.providers.anthropic_passthrough import MessagesRelay, anthropic_headers
from proxy.upstream import InBandError

from .fakeanthropic import Reply, sse, stream_events, text, tool_use, usage


def events(reply: Reply) -> list[bytes]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up", "content": reply.content,
               "stop_reason": reply.stop_reason, "stop_sequence": None, "usage": reply.usage}
    return [sse(e) for e in stream_events(reply, message)]


def feed_all(relay: MessagesRelay, data: bytes, cuts: list[int]) -> list[bytes]:
    out, last = [], 0
    for cut in [*cuts, len(data)]:
        out.append(relay.feed(data[last:cut]))
        last = cut
    return out


REPLY = Reply(content=[text("Hello, world"), tool_use("toolu_1", "now", {"tz": "UTC"})], stop_reason="tool_use",
              usage=usage(40, 9, cache_read=100, cache_write=7))


@pytest.mark.parametrize("cut", range(0, 400, 7))
async def test_relayed_unchanged_however_cut(cut: int) -> None:
    data = b"".join(events(REPLY))
    relay = MessagesRelay()
    out = feed_all(relay, data, [min(cut, len(data)), min(cut + 300, len(data))])
    assert b"".join(out) == data
    assert relay.done and relay.committed
    # input + cache read + cache write, output from message_delta
    assert relay.usage == {"prompt_tokens": 147, "completion_tokens": 9, "total_tokens": 156,
                           "prompt_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 7}}


async def test_message_start_and_pings_are_held_until_content() -> None:
    start, ping, first, *rest = events(REPLY)
    relay = MessagesRelay()
    assert relay.feed(start) == b"" and relay.feed(ping) == b"" and relay.feed(ping) == b""
    assert not relay.committed
    assert relay.feed(first) == start + ping + ping + first
    assert relay.committed and relay.feed(rest[0]) == rest[0]


async def test_an_error_before_content_fails_over_with_nothing_relayed() -> None:
    start, ping, *_ = events(REPLY)
    error = sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    relay = MessagesRelay()
    assert relay.feed(start + ping) == b""
    with pytest.raises(InBandError) as raised:
        relay.feed(error)
    assert raised.value.tail == b""
    assert raised.value.verdict.fault is Fault.TRANSIENT and raised.value.verdict.shared  # the whole service


async def test_an_error_after_content_ends_the_stream_with_the_upstreams_event() -> None:
    start, ping, first, second, *_ = events(REPLY)
    error = sse({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}})
    relay = MessagesRelay()
    assert relay.feed(start + ping + first) == start + ping + first
    with pytest.raises(InBandError) as raised:
        relay.feed(second + error + b"event: ping\ndata: {}\n\n")
    assert raised.value.tail == second + error  # what came before it, then the error itself
    assert not relay.done


async def test_text_that_mentions_errors_is_not_one() -> None:
    reply = Reply(content=[text('event: error "error" message_stop')], piece=100)
    data = b"".join(events(reply))
    relay = MessagesRelay()
    assert relay.feed(data) == data and relay.done


async def test_an_error_event_that_is_not_json_is_a_bad_response() -> None:
    start, ping, first, *_ = events(REPLY)
    relay = MessagesRelay()
    relay.feed(start + ping + first)
    with pytest.raises(UpstreamFailure):
        relay.feed(b"event: error\ndata: <html>\n\n")


async def test_usage_from_message_delta_repeating_the_input_counts() -> None:
    reply = Reply(usage=usage(10, 3, cache_read=5), full_delta_usage=True)
    relay = MessagesRelay()
    relay.feed(b"".join(events(reply)))
    assert relay.usage is not None and (relay.usage["prompt_tokens"], relay.usage["completion_tokens"]) == (15, 3)


async def test_a_stream_without_message_stop_is_not_done() -> None:
    relay = MessagesRelay()
    relay.feed(b"".join(events(REPLY)[:-1]))
    assert relay.committed and not relay.done


def test_headers_carry_the_clients_version_and_both_betas() -> None:
    config = ProviderConfig(name="c", type="anthropic", base_url="http://x", anthropic_beta=("ours-1",))
    assert anthropic_headers(config, version=None, beta=None) == b"anthropic-version: 2023-06-01\r\nanthropic-beta: ours-1\r\n"
    assert anthropic_headers(config, version="2024-01-01", beta="theirs-1, ours-1,theirs-2") == (
        b"anthropic-version: 2024-01-01\r\nanthropic-beta: ours-1,theirs-1,theirs-2\r\n")
    bare = ProviderConfig(name="c", type="anthropic", base_url="http://x")
    assert anthropic_headers(bare, version=None, beta=" ") == b"anthropic-version: 2023-06-01\r\n"



async def test_a_stream_framed_with_crlf() -> None:
    """SSE allows CRLF line ends: the end and an error after the commit are still seen."""
    data = b"".join(events(REPLY)).replace(b"\n", b"\r\n")
    relay = MessagesRelay()
    assert relay.feed(data) == data and relay.done
    start, ping, first, *_ = (e.replace(b"\n", b"\r\n") for e in events(REPLY))
    relay = MessagesRelay()
    relay.feed(start + ping + first)
    error = sse({"type": "error", "error": {"type": "api_error", "message": "Internal server error"}}).replace(b"\n", b"\r\n")
    with pytest.raises(InBandError) as raised:
        relay.feed(error)
    assert raised.value.tail == error
