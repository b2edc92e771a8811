"""Splicing JSON bodies: `splice` itself, `Call.upstream_request` on recorded bodies, and the
bytes a running gateway's upstream receives.

Every member the gateway does not change must reach the upstream byte for byte.
"""

from __future__ import annotations

import json
from typing import Any, cast

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.call import Call
from proxy.jsonsplice import SpliceError, _scanned_members, splice
from proxy.validation import parse_chat_request

from .conftest import KEY, Upstream, make_config, sse_events, stream_handler

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MESSAGES = b'[{"role":"user","content":"hi"}]'
# a value with whitespace, escapes and number forms a re-encoder would normalise
SPACED = b'[ { "role" : "user" ,\n  "content" : "caf\\u00e9 \\ud83d\\ude00 \\/ \\" \\t" } ]'
DEEP = b"[" * 1020 + b"]" * 1020  # orjson accepts it; msgspec's recursion limit does not
RAW = msgspec.json.Decoder(dict[str, msgspec.Raw])


SPLICES = [
    pytest.param(b'{"a":1,"b":2}', {"values": {"a": b"[3]"}}, b'{"a":[3],"b":2}', id="set-in-place"),
    pytest.param(b'{"a":1}', {"values": {"c": b"null", "b": b'"x"'}}, b'{"a":1,"c":null,"b":"x"}', id="add-in-order"),
    pytest.param(b'{"a":1,"b":2}', {"drop": ["a", "absent"]}, b'{"b":2}', id="drop"),
    pytest.param(b'{"a":1}', {"drop": ["a"]}, b"{}", id="drop-all"),
    pytest.param(b" { } ", {"values": {"a": b"1"}}, b'{"a":1}', id="empty-object"),
    pytest.param(b'{"a":1}', {}, b'{"a":1}', id="no-edit"),
    pytest.param(
        b'{"o": {"k": 1e2, "j": "\\u0041"}, "z": 0}',
        {"nested": {"o": {"j": b"2", "n": b"true"}}},
        b'{"o":{"k":1e2,"j":2,"n":true},"z":0}',
        id="nested-extended",
    ),
    pytest.param(b'{"z":0}', {"nested": {"o": {"n": b"true"}}}, b'{"z":0,"o":{"n":true}}', id="nested-created"),
    pytest.param(b'{"o":null}', {"nested": {"o": {"n": b"1"}}}, b'{"o":{"n":1}}', id="nested-null"),
    pytest.param(b'{"we\\"ird":1}', {"values": {"new\\u00e9": b"2"}}, b'{"we\\"ird":1,"new\\\\u00e9":2}', id="names-escaped"),
    pytest.param(b'{"caf\\u00e9":1}', {"drop": ["x"]}, '{"café":1}'.encode(), id="name-escape-becomes-character"),
    pytest.param(b'{"a":1,"b":2,"a":3}', {"values": {"b": b"0"}}, b'{"a":3,"b":0}', id="duplicate-first-place-last-value"),
]


@pytest.mark.parametrize(("body", "edits", "expected"), SPLICES)
def test_splice(body: bytes, edits: dict[str, Any], expected: bytes) -> None:
    assert splice(body, **edits) == expected


@pytest.mark.parametrize(
    ("body", "edits"),
    [
        (b"[1]", {}),
        (b'"a"', {}),
        (b'{"a":1', {}),
        (b'{"a":1}x', {}),
        (b"", {}),
        (b'{"o":[1]}', {"nested": {"o": {"k": b"1"}}}),
        (b'{"o":"s"}', {"nested": {"o": {"k": b"1"}}}),
        (b"[" + DEEP + b"]", {}),
        (b'{"a":' + b"[" * 1100 + b"]" * 1100 + b"}", {}),
    ],
)
def test_splice_refuses_what_is_not_an_object(body: bytes, edits: dict[str, Any]) -> None:
    with pytest.raises(SpliceError):
        splice(body, **edits)


SCANNED = [
    (b"{}", {}),
    (
        b' {\n"a" : 1 , "b":[ [1], {"c": "]}[{,:\\""} ] ,"d":{"e":{}} }\n',
        {"a": b"1", "b": b'[ [1], {"c": "]}[{,:\\""} ]', "d": b'{"e":{}}'},
    ),
    (b'{"a":' + DEEP + b',"b":"x"}', {"a": DEEP, "b": b'"x"'}),
    (b'{"a":{"b":' + DEEP + b"}}", {"a": b'{"b":' + DEEP + b"}"}),
    (b'{"a":1,"a":[2]}', {"a": b"[2]"}),
]


@pytest.mark.parametrize(("body", "expected"), SCANNED)
def test_scan_without_a_stack_finds_the_top_level_members(body: bytes, expected: dict[str, bytes]) -> None:
    assert {name: bytes(raw) for name, raw in _scanned_members(body).items()} == expected


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",))),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)
LAYOUTS = [
    {},
    {"ensure_ascii": False, "separators": (",", ":")},
    {"indent": 1},
    {"separators": (" ,\t", " :\r\n ")},
]


@settings(max_examples=200, deadline=None, derandomize=True, database=None)  # bounded, the same every run
@given(
    members=st.dictionaries(st.sampled_from(["model", "a", "b", "c", "request_id", "é"]), JSON_VALUES),
    layout=st.sampled_from(LAYOUTS),
)
def test_untouched_members_keep_their_bytes(members: dict[str, Any], layout: dict[str, Any]) -> None:
    body = json.dumps(members, **layout).encode()
    before = {name: bytes(raw) for name, raw in RAW.decode(body).items()}
    assert {name: bytes(raw) for name, raw in _scanned_members(body).items()} == before
    after = RAW.decode(splice(body, values={"model": b'"m"'}, drop=("request_id",)))
    expected = {**before, "model": b'"m"'}
    expected.pop("request_id", None)
    assert {name: bytes(raw) for name, raw in after.items()} == expected
    assert list(after) == list(expected)


def upstream_request(body: bytes, upstream_model: str) -> bytes:
    call = Call(gateway=cast(Any, None), request_id="req_test", started=0.0)
    call.body, call.parsed = body, parse_chat_request(body)
    return call.upstream_request(upstream_model)


REWRITES = [
    pytest.param(
        b'{"model":"gpt-test","messages":' + MESSAGES + b',"seed":18446744073709551616}',
        "up",
        b'{"model":"up","messages":' + MESSAGES + b',"seed":18446744073709551616}',
        id="big-integer-seed",
    ),
    pytest.param(
        b'{"model":"gpt-test","messages":' + MESSAGES
        + b',"temperature":1.0,"top_p":1e-1,"x_a":1E+2,"x_b":-0.0,"x_c":0.10000000000000000555}',
        "up",
        b'{"model":"up","messages":' + MESSAGES
        + b',"temperature":1.0,"top_p":1e-1,"x_a":1E+2,"x_b":-0.0,"x_c":0.10000000000000000555}',
        id="number-forms",
    ),
    pytest.param(
        b'{ "model" : "gpt-test" ,\n "messages" : ' + SPACED + b' , "x_\xc3\xa9" : { "k" : [ 1 ] } }',
        "up",
        b'{"model":"up","messages":' + SPACED + b',"x_\xc3\xa9":{ "k" : [ 1 ] }}',
        id="escapes-and-whitespace-inside-values",
    ),
    pytest.param(
        b'{"model":"same","request_id":"mine-1","messages":' + MESSAGES + b',"user":"u1"}',
        "same",
        b'{"model":"same","messages":' + MESSAGES + b',"user":"u1"}',
        id="request-id-dropped",
    ),
    pytest.param(
        b'{"model":"same","request_id":null,"messages":' + MESSAGES + b"}",
        "same",
        b'{"model":"same","messages":' + MESSAGES + b"}",
        id="null-request-id-dropped",
    ),
    pytest.param(
        b'{"model":"same","messages":' + MESSAGES + b',"stream":true}',
        "same",
        b'{"model":"same","messages":' + MESSAGES + b',"stream":true,"stream_options":{"include_usage":true}}',
        id="stream-options-created",
    ),
    pytest.param(
        b'{"model":"same","stream_options":null,"messages":' + MESSAGES + b',"stream":true}',
        "same",
        b'{"model":"same","stream_options":{"include_usage":true},"messages":' + MESSAGES + b',"stream":true}',
        id="stream-options-null",
    ),
    pytest.param(
        b'{"model":"same","stream":true,"stream_options":{"x_rate": 1.50, "include_usage": false,'
        b' "x_big": 18446744073709551616},"messages":' + MESSAGES + b"}",
        "same",
        b'{"model":"same","stream":true,"stream_options":{"x_rate":1.50,"include_usage":true,'
        b'"x_big":18446744073709551616},"messages":' + MESSAGES + b"}",
        id="stream-options-extended",
    ),
    pytest.param(
        b'{"model":"gpt-test","seed":1,"messages":' + MESSAGES + b',"seed":2,"request_id":"a","request_id":"b"}',
        "up",
        b'{"model":"up","seed":2,"messages":' + MESSAGES + b"}",
        id="duplicates-read-as-the-gateway-read-them",
    ),
    pytest.param(
        b'{"model":"gpt-test","messages":' + MESSAGES + b',"request_id":"r","stream":true,"seed":1e2}',
        "up",
        b'{"model":"up","messages":' + MESSAGES + b',"stream":true,"seed":1e2,"stream_options":{"include_usage":true}}',
        id="every-change-at-once",
    ),
]


@pytest.mark.parametrize(("body", "upstream_model", "expected"), REWRITES)
def test_rewrite_changes_only_what_it_must(body: bytes, upstream_model: str, expected: bytes) -> None:
    sent = upstream_request(body, upstream_model)
    assert sent == expected


def test_nothing_to_change_forwards_the_clients_bytes() -> None:
    body = b'{ "model" : "same", "messages" : ' + MESSAGES + b', "seed": 18446744073709551616 }'
    sent = upstream_request(body, "same")
    assert sent is body


def test_rewrite_is_made_once_per_upstream_model() -> None:
    body = b'{"model":"gpt-test","messages":' + MESSAGES + b"}"
    call = Call(gateway=cast(Any, None), request_id="req_test", started=0.0)
    call.body, call.parsed = body, parse_chat_request(body)
    first = call.upstream_request("a")
    assert call.upstream_request("a") is first
    assert call.upstream_request("b") == b'{"model":"b","messages":' + MESSAGES + b"}"


def test_body_too_deep_for_msgspec_is_still_spliced() -> None:
    body = b'{"model":"gpt-test","messages":' + MESSAGES + b',"x_deep":' + DEEP + b',"seed":1.0}'
    sent = upstream_request(body, "up")
    assert sent == b'{"model":"up","messages":' + MESSAGES + b',"x_deep":' + DEEP + b',"seed":1.0}'


def test_stream_options_too_deep_for_msgspec_is_still_extended() -> None:
    body = b'{"model":"same","stream":true,"messages":' + MESSAGES + b',"stream_options":{"x_deep":' + DEEP + b"}}"
    sent = upstream_request(body, "same")
    assert sent == body[:-2] + b',"include_usage":true}}'


def test_body_the_splice_refuses_is_re_encoded_not_refused() -> None:
    # parsers disagreeing is made up here: the body is not what was parsed
    call = Call(gateway=cast(Any, None), request_id="req_test", started=0.0)
    call.parsed = parse_chat_request(b'{"model":"gpt-test","messages":' + MESSAGES + b',"seed":1.0}')
    call.body = b"not what orjson read"
    sent = call.upstream_request("up")
    assert sent == b'{"model":"up","messages":' + MESSAGES + b',"seed":1.0}'


E2E = [
    pytest.param(
        b'{"model":"gpt-test","request_id":"mine-1","messages":' + SPACED
        + b',"seed":18446744073709551616,"temperature":1.0}',
        b'{"model":"upstream-model","messages":' + SPACED + b',"seed":18446744073709551616,"temperature":1.0}',
        id="json",
    ),
    pytest.param(
        b'{"model":"same-name","stream":true,"messages":' + SPACED + b',"seed":18446744073709551616}',
        b'{"model":"same-name","stream":true,"messages":' + SPACED
        + b',"seed":18446744073709551616,"stream_options":{"include_usage":true}}',
        id="stream",
    ),
    pytest.param(  # orjson.dumps stops at 255 levels: this was a 500 when re-encoded
        b'{"model":"gpt-test","messages":' + MESSAGES + b',"x_deep":' + b"[" * 300 + b"]" * 300 + b"}",
        b'{"model":"upstream-model","messages":' + MESSAGES + b',"x_deep":' + b"[" * 300 + b"]" * 300 + b"}",
        id="nested-300-levels",
    ),
    pytest.param(
        b'{"model":"gpt-test","messages":' + MESSAGES + b',"x_deep":' + DEEP + b"}",
        b'{"model":"upstream-model","messages":' + MESSAGES + b',"x_deep":' + DEEP + b"}",
        id="nested-too-deep-for-msgspec",
    ),
]


@pytest.mark.parametrize(("body", "expected"), E2E)
async def test_upstream_receives_the_spliced_bytes(
    http: Any, upstream: Upstream, start_gateway: Any, body: bytes, expected: bytes
) -> None:
    if b'"stream":true' in body:
        upstream.handler = stream_handler(sse_events(["hi"]))
    gateway = await start_gateway(make_config([upstream.url]))
    async with http.post(f"{gateway.url}/v1/chat/completions", data=body, headers=AUTH) as response:
        assert response.status == 200, await response.read()
        await response.read()
    assert upstream.requests[0]["body"] == expected
