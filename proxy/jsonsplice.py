"""Splicing a JSON object: set, add or drop members and keep every other member's bytes.

Owns byte-level edits of bodies the gateway forwards (big integers, number forms, escapes and
whitespace inside values survive because they are never re-encoded). It knows no field's
meaning and does no I/O; the caller has parsed the body and decides what changes.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import Union, cast

import msgspec
import orjson
from msgspec import Raw

__all__ = ["SpliceError", "splice"]

# Each member's value as a Raw slice of the input, skipped over in C without building objects;
# the encoder writes Raw values as they are. One of each for the process: building a decoder
# per call costs more than the decoding itself.
_MEMBERS = msgspec.json.Decoder(dict[str, Raw])
_ENCODER = msgspec.json.Encoder()
# A whole string, a run of openers or closers, a comma or a colon: enough to find top-level
# members without a stack, in the rare body nested deeper than msgspec will recurse.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[{]+|[\]}]+|[,:]')
_JSON_SPACE = b" \t\r\n"
_NONE: Mapping[str, bytes] = MappingProxyType({})
_NONE_NESTED: Mapping[str, Mapping[str, bytes]] = MappingProxyType({})

Member = Union[Raw, "Members"]
Members = dict[str, Member]


class SpliceError(ValueError):
    """The body (or a member named in `nested`) is not one JSON object."""


def splice(
    body: bytes,
    *,
    values: Mapping[str, bytes] = _NONE,
    drop: Collection[str] = (),
    nested: Mapping[str, Mapping[str, bytes]] = _NONE_NESTED,
) -> bytes:
    """`body` with `values` set, `drop` removed and `nested`'s members set inside those members.

    Values are raw JSON, written as given. A set member keeps its place; a new one is added at
    the end, as is a `nested` object that was absent (or null). Members are written compactly,
    `"name":value` with `,` between; each value keeps its bytes, each name is the same string
    (re-encoded: an escape in a name comes out as the character). A name written twice is kept
    once, at its first place with its last value, as `orjson.loads` reads it.
    """
    members = _members(body)
    for name in drop:
        members.pop(name, None)
    for name, inner in nested.items():
        members[name] = _with_values(_object(members.get(name)), inner)
    return _ENCODER.encode(_with_values(members, values))


def _members(body: bytes) -> Members:
    try:
        # a dict[str, Raw] is Members; the cast only answers dict's invariance
        return cast(Members, _MEMBERS.decode(body))
    except msgspec.DecodeError as exc:
        raise SpliceError(str(exc)) from None
    except RecursionError:
        return _scanned_members(body)


def _object(value: Member | None) -> Members:
    """A nested member's own members: none when it is absent or null."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    # a Raw never equals bytes: compare its length, then a copy of four bytes at most
    if len(value) == 4 and bytes(value) == b"null":
        return {}
    return _members(value)


def _with_values(members: Members, values: Mapping[str, bytes]) -> Members:
    for name, value in values.items():
        members[name] = Raw(value)
    return members


def _scanned_members(body: bytes) -> Members:
    """Top-level members of a body too deep for msgspec, found by counting depth.

    Checked with orjson first (which reads up to 1023 levels), so the scan may assume valid JSON.
    """
    body = bytes(body)  # a nested member's Raw: orjson and the scan read bytes
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SpliceError(str(exc)) from None
    if type(parsed) is not dict:
        raise SpliceError("not a JSON object")
    members: Members = {}
    name: str | None = None
    depth = start = 0
    for token in _TOKEN.finditer(body):
        first = body[token.start()]
        if first == 0x22:  # a string: at depth 1 and before its colon, a member's name
            if depth == 1 and name is None:
                name = orjson.loads(token.group())
        elif first in b"[{":
            depth += token.end() - token.start()
        elif first in b"]}":
            closes = token.end() - token.start()
            if closes >= depth:  # this run closes the body: the last value ends before it
                if name is not None:
                    members[name] = _raw(body, start, token.start() + depth - 1)
                break
            depth -= closes
        elif depth == 1 and first == 0x3A:  # ':'
            start = token.end()
        elif depth == 1 and name is not None:  # ','
            members[name] = _raw(body, start, token.start())
            name = None
    return members


def _raw(body: bytes, start: int, end: int) -> Raw:
    return Raw(body[start:end].strip(_JSON_SPACE))
