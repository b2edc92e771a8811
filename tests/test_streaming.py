"""SseScanner on raw bytes: boundaries, usage capture and stripping, the end marker."""

from __future__ import annotations

import pytest

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
