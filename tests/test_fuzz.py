"""Fuzzing what clients control: the request body's parser, and the headers of a running gateway.

Bounded and deterministic (derandomized, no example database) so the suite stays fast and CI
sees the same examples every run.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.errors import GatewayError
from proxy.validation import RANGES, ROLES, parse_chat_request

from .conftest import KEY, make_config
from . import edgeserver

start_edge_gateway = edgeserver.start_edge_gateway  # the fixture, under its name here

FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries({}, optional={"role": st.sampled_from(sorted(ROLES)) | values, "content": values})
    | values,
    max_size=3,
)
FIELDS = [name for name, *_ in RANGES] + ["stop", "tools", "stream", "request_id", "user", "api_base"]
OPTIONAL = {
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "x"]), values, max_size=2) | values,
    **{name: values for name in FIELDS},
}
# Half the bodies get past `model` and `messages`, so the checks after them are reached too.
bodies = st.fixed_dictionaries(
    {"model": st.just("gpt-test"), "messages": messages.filter(bool)}, optional=OPTIONAL
) | st.fixed_dictionaries({}, optional={"model": values, "messages": messages | values, **OPTIONAL})
raw_bodies = (
    bodies.map(lambda body: json.dumps(body).encode())
    | values.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=64)
)


@FUZZ
@given(body=raw_bodies)
def test_the_body_parser_returns_or_refuses_with_a_gateway_error(body: bytes) -> None:
    try:
        chat = parse_chat_request(body)
    except GatewayError as error:
        assert error.status == 400
        assert set(orjson.loads(error.body())["error"]) == {"message", "type", "param", "code"}
        return
    assert type(chat.model) is str and type(chat.stream) is bool


GOOD = orjson.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]})
MAX_BODY = 4096
anything = st.binary(max_size=48).map(lambda raw: raw.replace(b"\r\n", b""))
odd = st.sampled_from([
    b"Bearer " + KEY.encode() + b"\x01", b"Bearer \xff\xfe", b"\xed\xa0\x80", "Bearer é".encode(),
    b"bearer", b"Bearer ", b"\x00", b"a" * 300, b"-1", b"99999999999999999999", b"4096", b"4097",
    b"1e3", b" 12", b"0x10", b"application/json; charset=\xff",
])
key = st.sampled_from([b"Bearer " + KEY.encode(), b"bearer  " + KEY.encode() + b" "])
# Each header is absent, usual, or odd, so some requests get through and the rest probe the edges.
headers = st.fixed_dictionaries({
    b"Authorization": st.none() | key | odd | anything,
    b"x-api-key": st.none() | st.just(KEY.encode()) | odd | anything,
    b"X-Request-Id": st.none() | st.just(b"req-1") | odd | anything,
    b"Content-Type": st.none() | st.just(b"application/json") | odd | anything,
    b"Content-Length": st.none() | odd | anything,
})
requests = st.tuples(st.sampled_from([b"POST /v1/chat/completions", b"GET /v1/models"]), headers)


def request_bytes(line: bytes, fields: dict[bytes, bytes | None]) -> bytes:
    body = GOOD if line.startswith(b"POST") else b""
    length = fields[b"Content-Length"]
    if length is None:
        length = str(len(body)).encode()
    elif length.isdigit() and len(body) < int(length) <= MAX_BODY:
        body = body.ljust(int(length))  # a body as long as announced: the request is complete
    head = [line + b" HTTP/1.1", b"Host: gw", b"Connection: close", b"Content-Length: " + length]
    head += [name + b": " + value for name, value in fields.items() if value is not None and name != b"Content-Length"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def answer_of(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed without an answer to {raw!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(body) < int(fields.get("content-length", "0")):
            chunk = sock.recv(65536)
            assert chunk, "the answer was cut"
            body += chunk
    return int(lines[0].split(" ")[1]), fields, body


@FUZZ
@given(request=requests)
def fuzz_headers(port: int, request: tuple[bytes, dict[bytes, bytes | None]]) -> None:
    raw = request_bytes(*request)
    status, fields, body = answer_of(port, raw)
    assert status < 500, (status, raw, body)
    assert fields["content-type"].startswith("application/json"), raw
    assert fields.get("x-request-id"), raw
    answer = orjson.loads(body)
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}, raw


async def test_no_header_bytes_make_a_500_or_a_non_json_answer(start_edge_gateway: Any) -> None:
    gateway = await start_edge_gateway(make_config(max_body_bytes=MAX_BODY))
    # hypothesis drives blocking sockets from a thread while this loop serves the gateway
    await asyncio.to_thread(fuzz_headers, gateway.server.port)
