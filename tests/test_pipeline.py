"""The request path's early stages over raw HTTP: authentication, validation, limits, ids."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from .conftest import KEY, Gateway, Upstream, make_config

AUTH = {"Authorization": f"Bearer {KEY}"}
GOOD = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}


def assert_error(body: bytes, status_code: str, param: str | None = None) -> dict[str, Any]:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status_code
    assert error["param"] == param
    return error


async def post(http: Any, gateway: Gateway, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    async with http.post(
        f"{gateway.url}/v1/chat/completions", data=body, headers={**AUTH, **(headers or {})}
    ) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, await response.read()


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_json", None),
        (b"", 400, "invalid_json", None),
        (b'{"messages": [{"role": "user", "content": "x"}]}', 400, "missing_field", "model"),
        (b'{"model": "gpt-test"}', 400, "missing_field", "messages"),
        (b'{"model": 7, "messages": []}', 400, "invalid_value", "model"),
        (b'{"model": "gpt-test", "messages": []}', 400, "invalid_value", "messages"),
        (b'{"model": "gpt-test", "messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_value", "messages[0].role"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "temperature": 2.5}', 400, "invalid_value", "temperature"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "temperature": "hot"}', 400, "invalid_value", "temperature"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "n": 0}', 400, "invalid_value", "n"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "n": 1.5}', 400, "invalid_value", "n"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "presence_penalty": -3}', 400, "invalid_value", "presence_penalty"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "frequency_penalty": 2.1}', 400, "invalid_value", "frequency_penalty"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "stop": ["a","b","c","d","e"]}', 400, "invalid_value", "stop"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "top_logprobs": 21}', 400, "invalid_value", "top_logprobs"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "max_tokens": 0}', 400, "invalid_value", "max_tokens"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "max_tokens": true}', 400, "invalid_value", "max_tokens"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "stream": "yes"}', 400, "invalid_value", "stream"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "request_id": "a\\r\\nX-Evil: 1"}', 400, "invalid_value", "request_id"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "api_base": "http://evil"}', 400, "unsupported_field", "api_base"),
        (b'{"model": "gpt-test", "messages": [{"role": "user"}], "base_url": "http://evil"}', 400, "unsupported_field", "base_url"),
        (b'{"model": "nope", "messages": [{"role": "user"}]}', 404, "model_not_found", "model"),
        (b'{"model": "embed", "messages": [{"role": "user"}]}', 422, "model_not_chat", "model"),
    ],
)
async def test_bad_requests_get_openai_errors_and_reach_nothing(
    http: Any, gateway: Gateway, upstream: Upstream, body: bytes, status: int, code: str, param: str | None
) -> None:
    got, headers, answer = await post(http, gateway, body)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_")
    assert_error(answer, code, param)
    assert upstream.requests == []


async def test_tools_over_128_refused(http: Any, gateway: Gateway, upstream: Upstream) -> None:
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]
    got, _, answer = await post(http, gateway, orjson.dumps({**GOOD, "tools": tools}))
    assert got == 400
    assert_error(answer, "invalid_value", "tools")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-nope"}, {"Authorization": "Basic abc"}, {"x-api-key": "sk-nope"}],
)
async def test_unknown_or_missing_key_is_401(http: Any, gateway: Gateway, upstream: Upstream, headers: dict[str, str]) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=headers) as response:
        assert response.status == 401
        assert_error(await response.read(), "invalid_api_key")
    assert upstream.requests == []


async def test_x_api_key_header_is_accepted(http: Any, gateway: Gateway, upstream: Upstream) -> None:
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers={"x-api-key": KEY}) as response:
        assert response.status == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/chat/completions", "/api/client/v1/chat/completions"])
async def test_every_chat_path_serves(http: Any, gateway: Gateway, path: str) -> None:
    async with http.post(f"{gateway.url}{path}", json=GOOD, headers=AUTH) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["message"]["content"] == "Hello there"


async def test_unknown_fields_pass_through_byte_for_byte(http: Any, start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway(make_config([upstream.url]))
    body = (
        b'{"model":"same-name","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],'
        b'"top_k":5,"reasoning_effort":"low","seed":1,"logprobs":true,'
        b'"response_format":{"type":"json_object"},   "x_custom":{"a":[1,2]}}'
    )
    got, _, _ = await post(http, gateway, body)
    assert got == 200
    assert upstream.requests[0]["body"] == body


async def test_oversized_body_is_413_before_reading(http: Any, start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway(make_config([upstream.url], max_body_bytes=1000))
    got, _, answer = await post(http, gateway, b"x" * 5000)
    assert got == 413
    assert_error(answer, "request_too_large")

    async def chunks() -> Any:
        for _ in range(50):
            yield b"y" * 100

    async with http.post(f"{gateway.url}/v1/chat/completions", data=chunks(), headers=AUTH) as response:
        assert response.status == 413
        assert_error(await response.read(), "request_too_large")
    assert upstream.requests == []


async def test_request_id_header_is_echoed_and_forwarded(http: Any, gateway: Gateway, upstream: Upstream) -> None:
    got, headers, _ = await post(http, gateway, orjson.dumps(GOOD), {"X-Request-Id": "abc-123"})
    assert got == 200
    assert headers["x-request-id"] == "abc-123"
    assert upstream.requests[0]["headers"]["x-request-id"] == "abc-123"


async def test_body_request_id_is_removed_upstream_and_inserted_first_in_answer(
    http: Any, gateway: Gateway, upstream: Upstream
) -> None:
    upstream_answer = b'{"id":"x","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    from .conftest import completion_handler

    upstream.handler = completion_handler(body=upstream_answer)
    got, headers, answer = await post(http, gateway, orjson.dumps({**GOOD, "request_id": "mine-1"}))
    assert got == 200
    assert headers["x-request-id"] == "mine-1"
    assert answer == b'{"request_id":"mine-1",' + upstream_answer[1:]
    assert "request_id" not in orjson.loads(upstream.requests[0]["body"])


async def test_client_credentials_and_hop_by_hop_headers_are_not_forwarded(
    http: Any, gateway: Gateway, upstream: Upstream
) -> None:
    headers = {"x-api-key": KEY, "Connection": "keep-alive, x-secret", "x-secret": "1", "Cookie": "a=b"}
    async with http.post(f"{gateway.url}/v1/chat/completions", json=GOOD, headers=headers) as response:
        assert response.status == 200
    sent = {k.lower(): v for k, v in upstream.requests[0]["headers"].items()}
    assert sent["authorization"] == "Bearer sk-upstream-0"
    assert "x-api-key" not in sent and "cookie" not in sent and "x-secret" not in sent
    assert KEY not in str(upstream.requests[0]["headers"])


async def test_health_and_readiness(http: Any, gateway: Gateway) -> None:
    async with http.get(f"{gateway.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{gateway.url}/readyz") as response:
        assert response.status == 200


async def test_admin_state_needs_the_admin_key(http: Any, start_gateway: Any, upstream: Upstream) -> None:
    gateway = await start_gateway(make_config([upstream.url], admin_key="adm-1"))
    async with http.get(f"{gateway.url}/admin/state", headers=AUTH) as response:
        assert response.status == 401
    async with http.get(f"{gateway.url}/admin/state", headers={"Authorization": "Bearer adm-1"}) as response:
        assert response.status == 200
        accounts = (await response.json())["accounts"]
    assert [a["account"] for a in accounts] == ["acct0"]


@pytest.mark.parametrize("role", [{"name": "user"}, ["user"], 7, None, True])
async def test_a_role_that_is_not_a_string_is_400(http: Any, gateway: Gateway, role: Any) -> None:
    body = orjson.dumps({"model": "gpt-test", "messages": [{"role": role, "content": "x"}]})
    got, _, answer = await post(http, gateway, body)
    assert got == 400
    assert_error(answer, "invalid_value", "messages[0].role")


OPTIONAL_FIELDS = (
    "stream", "stream_options", "temperature", "top_p", "n", "presence_penalty", "frequency_penalty",
    "top_logprobs", "max_tokens", "max_completion_tokens", "stop", "tools", "request_id", "user",
)


@pytest.mark.parametrize("field", OPTIONAL_FIELDS)
async def test_null_is_absent_for_every_optional_field(http: Any, gateway: Gateway, field: str) -> None:
    got, _, answer = await post(http, gateway, orjson.dumps({**GOOD, field: None}))
    assert got == 200, answer


async def test_null_include_usage_is_absent(http: Any, gateway: Gateway) -> None:
    got, _, answer = await post(http, gateway, orjson.dumps({**GOOD, "stream_options": {"include_usage": None}}))
    assert got == 200, answer


@pytest.mark.parametrize(
    ("method", "path", "header"),
    [
        ("POST", "/v1/chat/completions", b"Authorization: Bearer \xff\xfesk"),
        ("POST", "/v1/chat/completions", b"x-api-key: sk-\xc3"),
        ("GET", "/v1/models", b"Authorization: Bearer \xed\xa0\x80"),
        ("GET", "/v1/models", b"x-api-key: \xff"),
        ("GET", "/admin/state", b"Authorization: Bearer adm-\xff"),
    ],
)
async def test_credentials_that_are_not_utf8_are_401(start_gateway: Any, method: str, path: str, header: bytes) -> None:
    from .edgeserver import exchange

    gateway = await start_gateway(make_config(admin_key="adm-1"))
    body = orjson.dumps(GOOD) if method == "POST" else b""
    raw = (
        f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n".encode()
        + header + b"\r\nConnection: close\r\n\r\n" + body
    )
    answer = await exchange(gateway.server.port, raw)
    assert answer.status == 401
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers["x-request-id"].startswith("req_")
    assert_error(answer.body, "invalid_api_key")


async def test_an_answer_that_already_failed_over_tells_sdks_not_to_retry(
    start_gateway: Any, make_upstream: Any
) -> None:
    import openai

    from .conftest import completion_handler

    upstreams = [await make_upstream() for _ in range(2)]
    for upstream in upstreams:
        upstream.handler = completion_handler(status=500)
    gateway = await start_gateway(make_config([u.url for u in upstreams], max_attempts=2))
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, timeout=20)
    assert client.max_retries == 2, "the SDK's default: it would send the request three times"
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    finally:
        await client.close()
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sum(len(u.requests) for u in upstreams) == 2, "max_attempts upstream attempts, not 3x"


async def test_draining_tells_sdks_to_retry(http: Any, gateway: Gateway, upstream: Upstream) -> None:
    from proxy.state import STATE

    gateway.server.app[STATE].draining = True
    got, headers, answer = await post(http, gateway, orjson.dumps(GOOD))
    assert got == 503
    assert_error(answer, "draining")
    assert headers["x-should-retry"] == "true"


async def test_a_refused_request_says_nothing_about_retrying(http: Any, gateway: Gateway) -> None:
    got, headers, _ = await post(http, gateway, b"{not json")
    assert got == 400 and "x-should-retry" not in headers


@pytest.mark.parametrize(
    ("error", "attempts", "advice"),
    [
        ("circuit_open", 0, "true"),
        ("ratelimit_unavailable", 0, "true"),
        ("draining", 0, "true"),
        ("no_account_available", 0, None),
        ("circuit_open", 1, "false"),
        ("no_account_available", 2, "false"),
        ("upstream_unreachable", 1, "false"),
        ("upstream_timeout", 3, "false"),
    ],
)
async def test_retry_advice_follows_the_attempts_made(
    gateway: Gateway, error: str, attempts: int, advice: str | None
) -> None:
    from proxy import errors
    from proxy.call import Call
    from proxy.pipeline import render_error
    from proxy.state import STATE

    made = {
        "circuit_open": lambda: errors.circuit_open(2.0),
        "ratelimit_unavailable": errors.ratelimit_unavailable,
        "draining": errors.draining,
        "no_account_available": errors.no_account_available,
        "upstream_unreachable": errors.upstream_unreachable,
        "upstream_timeout": lambda: errors.upstream_timeout("slow"),
    }[error]()
    call = Call(gateway=gateway.server.app[STATE].gateway, request_id="r-1", started=0.0)
    call.attempts = attempts
    response = render_error(call, made)
    assert response.headers.get("x-should-retry") == advice


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_400(
    start_gateway: Any, upstream: Upstream, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    import logging

    from .edgeserver import exchange

    gateway = await start_gateway(make_config([upstream.url]))
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    ).encode()
    answer = await exchange(gateway.server.port, raw)
    assert answer.status == 400
    assert_error(answer.body, "malformed_request")
    assert upstream.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "the client's fault, not an error"
