"""Redaction: matched spans replaced by `[REDACTED:<CATEGORY>]`, and a parsed body with some of
its texts replaced, everything else as it was. Pure functions; the caller re-encodes once."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .detectors import Match
from .extract import Path

# What a JSON text's strings are made of, to tell whether a span lies inside one.
_STRING_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"')


def marker(category: str) -> str:
    return f"[REDACTED:{category.upper()}]"


def merged(matches: Sequence[Match]) -> list[Match]:
    """`matches` in order with overlapping ones joined (the first one's category kept)."""
    result: list[Match] = []
    for match in sorted(matches, key=lambda m: (m.start, -m.end)):
        if result and match.start < result[-1].end:
            last = result[-1]
            if match.end > last.end:
                result[-1] = Match(last.category, last.start, match.end)
        else:
            result.append(match)
    return result


def redact_text(text: bytes, matches: Sequence[Match], *, json_text: bool = False) -> str:
    """`text` (UTF-8) with each match replaced by its marker. In a JSON text a match outside
    its strings (a number) becomes a quoted marker, so the document stays valid JSON."""
    strings = [m.span() for m in _STRING_TOKEN.finditer(text)] if json_text else []
    parts: list[bytes] = []
    copied = 0
    for match in merged(matches):
        parts.append(text[copied : match.start])
        replacement = marker(match.category).encode()
        if json_text and not any(start < match.start and match.end < end for start, end in strings):
            replacement = b'"' + replacement + b'"'
        parts.append(replacement)
        copied = match.end
    parts.append(text[copied:])
    return b"".join(parts).decode(errors="replace")


def with_texts(data: dict[str, Any], edits: Sequence[tuple[Path, str]]) -> dict[str, Any]:
    """A copy of `data` with the string at each path replaced; only the containers on those
    paths are copied, the rest is shared with `data`."""
    root = dict(data)
    copies: dict[Path, Any] = {(): root}
    for path, value in edits:
        node: Any = root
        for depth in range(len(path) - 1):
            prefix = path[: depth + 1]
            child = copies.get(prefix)
            if child is None:
                original = node[path[depth]]
                child = copies[prefix] = list(original) if type(original) is list else dict(original)
                node[path[depth]] = child
            node = child
        node[path[-1]] = value
    return root
