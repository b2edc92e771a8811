"""SseScanner on raw bytes: boundaries split anywhere, usage capture and stripping, the end marker,
the size cap, and work linear in an event's size."""

from __future__ import annotations

import tracemalloc

import pytest

from proxy import streaming
from proxy.streaming import SseScanner, event_boundary

from .conftest import sse_chunk, sse_events


@pytest.mark.parametrize(
    ("data", "cut"),
    [(b"", 0), (b"data: x", 0), (b"data: x\n\n", 9), (b"data: x\n\ndata: y", 9), (b"data: x\r\n\r\n", 11)],
)
def test_event_boundary(data: bytes, cut: int) -> None:
    assert event_boundary(data) == cut


def feed_all(scanner: SseScanner, pieces: list[bytes]) -> bytes:
    return b"".join(scanner.feed(p) for p in pieces)


@pytest.mark.parametrize("size", [1, 3, 50, 10_000])
def test_any_split_gives_the_same_output(size: int) -> None:
    raw = b"".join(sse_events(["a", "b"], usage=(9, 2)))
    pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
    scanner = SseScanner(strip_usage=True)
    out = feed_all(scanner, pieces)
    assert scanner.usage == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert scanner.done and scanner.pending == b""
    assert b'"choices":[]' not in out
    assert out == b"".join(e for e in sse_events(["a", "b"], usage=(9, 2)) if b'"choices":[]' not in e)


def test_usage_kept_when_the_client_asked() -> None:
    raw = b"".join(sse_events(["a"]))
    scanner = SseScanner(strip_usage=False)
    assert scanner.feed(raw) == raw
    assert scanner.usage is not None and scanner.usage["completion_tokens"] == 3


def test_usage_on_a_content_chunk_is_read_but_never_stripped() -> None:
    event = sse_chunk("last", finish="stop", usage={"prompt_tokens": 1, "completion_tokens": 1})
    scanner = SseScanner(strip_usage=True)
    assert scanner.feed(event) == event
    assert scanner.usage == {"prompt_tokens": 1, "completion_tokens": 1}


def test_null_usage_is_not_parsed_as_usage() -> None:
    scanner = SseScanner(strip_usage=True)
    event = sse_chunk("x", usage=None)
    assert scanner.feed(event) == event and scanner.usage is None


def test_multiline_data_event_and_comments() -> None:
    raw = b': keep-alive\n\ndata: {"choices": [],\ndata:  "usage": {"prompt_tokens": 4}}\n\ndata: [DONE]\n\n'
    scanner = SseScanner(strip_usage=True)
    assert scanner.feed(raw) == b": keep-alive\n\ndata: [DONE]\n\n"
    assert scanner.usage == {"prompt_tokens": 4}


def test_incomplete_event_is_held_back() -> None:
    scanner = SseScanner(strip_usage=True)
    assert scanner.feed(b"data: {") == b""
    assert scanner.pending == b"data: {"
    assert not scanner.done


def fed_in(scanner: SseScanner, pieces: list[bytes], raw: bytes) -> None:
    """Feeds `pieces` (which join to `raw`) and checks the scanner after each against the plain
    reference, a tail re-joined per piece and cut at its last boundary: it has given out exactly
    the events before that cut (as one feed of them would) and holds back the rest."""
    out, tail, fed = b"", b"", 0
    for piece in pieces:
        out += scanner.feed(piece)
        fed += len(piece)
        tail += piece
        cut = event_boundary(tail)
        complete, tail = fed - len(tail) + cut, tail[cut:]
        assert out == SseScanner(strip_usage=scanner.strip_usage).feed(raw[:complete]), (fed, pieces)
        assert scanner.pending == tail, (fed, pieces)


LF = b"".join(sse_events(["a", "b"], usage=(9, 2)))
SPLIT_STREAMS = {
    "openai stream, LF": LF,
    "openai stream, CRLF": LF.replace(b"\n\n", b"\r\n\r\n"),
    "comment, multi-line data, usage": (
        b': keep-alive\n\ndata: {"choices": [],\ndata:  "usage": {"prompt_tokens": 4}}\n\ndata: [DONE]\n\n'
    ),
    "CRLF lines": b"data: x\r\ndata: y\r\n\r\n: ping\r\n\r\ndata: [DONE]\r\n\r\n",
    "runs of line breaks": b"data: a\n\n\ndata: b\r\n\r\n\r\ndata: c\r\n\ndata: d\n\r\n\r\n",
    "no boundary at the end": b"data: x\n\ndata: y\r\n",
}


@pytest.mark.parametrize("raw", SPLIT_STREAMS.values(), ids=SPLIT_STREAMS.keys())
@pytest.mark.parametrize("strip_usage", [True, False])
def test_a_split_at_any_position_gives_the_events_of_the_bytes_so_far(raw: bytes, strip_usage: bool) -> None:
    for at in range(len(raw) + 1):
        fed_in(SseScanner(strip_usage=strip_usage), [raw[:at], raw[at:]], raw)


@pytest.mark.parametrize("raw", SPLIT_STREAMS.values(), ids=SPLIT_STREAMS.keys())
def test_byte_by_byte_gives_the_events_of_the_bytes_so_far(raw: bytes) -> None:
    fed_in(SseScanner(strip_usage=True), [raw[i : i + 1] for i in range(len(raw))], raw)


@pytest.mark.parametrize("boundary", [b"\n\n", b"\r\n\r\n"])
def test_three_pieces_split_anywhere_around_boundaries(boundary: bytes) -> None:
    raw = b"data: 1" + boundary + b"data: 2" + boundary + b": c" + boundary + b"data: [DONE]" + boundary
    for first in range(len(raw) + 1):
        for second in range(first, len(raw) + 1):
            pieces = [raw[:first], raw[first:second], raw[second:]]
            fed_in(SseScanner(strip_usage=True), pieces, raw)


def allocated_while_feeding(size: int, piece: int = 1024) -> int:
    """Bytes each feed allocates at its peak, summed over an event of `size` bytes fed in
    `piece`-byte chunks, then completed: a count of the copying the scanner does, deterministic."""
    event = b"data: " + b"x" * (size - 6)
    chunks = [event[i : i + piece] for i in range(0, len(event), piece)] + [b"\n\n"]
    scanner = SseScanner(strip_usage=True)
    total = 0
    tracemalloc.start()
    try:
        for chunk in chunks:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = scanner.feed(chunk)
            total += tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert out == event + b"\n\n"
    return total


def test_a_large_event_in_small_chunks_costs_work_linear_in_its_size() -> None:
    size = 512 * 1024
    small, large = allocated_while_feeding(size), allocated_while_feeding(4 * size)
    # a tail re-joined per chunk copies size²/(2 × piece) bytes: 128 MiB here, 2 GiB at 4 × size
    assert small <= 2 * size  # each byte copied about once
    assert large <= 4.5 * small


def test_an_unfinished_event_may_reach_the_cap_and_no_further() -> None:
    at_cap = b"data: " + b"y" * (streaming.MAX_EVENT_BYTES - 6)
    scanner = SseScanner(strip_usage=True)
    assert scanner.feed(b"data: first\n\n" + at_cap[:1000]) == b"data: first\n\n"
    assert scanner.feed(at_cap[1000:]) == b""
    assert scanner.feed(b"\n\n") == at_cap + b"\n\n"

    scanner = SseScanner(strip_usage=True)
    scanner.feed(at_cap)
    with pytest.raises(streaming.EventTooLarge, match="over 8388608 bytes"):
        scanner.feed(b"y")


def test_an_event_past_the_cap_in_one_chunk_is_refused() -> None:
    with pytest.raises(streaming.EventTooLarge):
        SseScanner(strip_usage=True).feed(b"data: " + b"y" * streaming.MAX_EVENT_BYTES)


def test_an_empty_chunk_changes_nothing() -> None:
    scanner = SseScanner(strip_usage=True)
    assert scanner.feed(b"") == b"" and scanner.pending == b""
    assert scanner.feed(b"data: x\n") == b""
    assert scanner.feed(b"") == b"" and scanner.pending == b"data: x\n"
    assert scanner.feed(b"\n") == b"data: x\n\n"
