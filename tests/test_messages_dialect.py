"""`messages_api`: the Messages API's errors, sticky-session keys, and `ConvertedMessages` in front
of each OpenAI-format provider type (pure: no upstream, no gateway)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy import errors
from proxy.config import ModelConfig, ProviderConfig, Target
from proxy.messages_api import COUNT_TOKENS, MESSAGES, ConvertedMessages, anthropic_error
from proxy.messages_validation import MessagesRequest
from proxy.metrics import Metrics
from proxy.providers import build


@pytest.mark.parametrize(("error", "status", "kind"), [
    (errors.invalid_value("max_tokens", "x"), 400, "invalid_request_error"),
    (errors.invalid_api_key(), 401, "authentication_error"),
    (errors.budget_exhausted(), 402, "billing_error"),
    (errors.model_not_allowed("m"), 403, "permission_error"),
    (errors.model_not_found("m"), 404, "not_found_error"),
    (errors.request_too_large(10), 413, "request_too_large"),
    (errors.rate_limited("key.rpm", 3), 429, "rate_limit_error"),
    (errors.internal_error(), 500, "api_error"),
    (errors.bad_upstream_response("x"), 500, "api_error"),
    (errors.upstream_unreachable(), 500, "api_error"),
    (errors.no_account_available(2), 529, "overloaded_error"),
    (errors.circuit_open(2), 529, "overloaded_error"),
    (errors.draining(), 529, "overloaded_error"),
    (errors.upstream_timeout("x"), 504, "timeout_error"),
])
def test_the_status_table_of_spec_10(error: errors.GatewayError, status: int, kind: str) -> None:
    got_status, body = MESSAGES.error_response(error, "req_1")
    assert (got_status, anthropic_error(error.status)) == (status, (status, kind))
    assert orjson.loads(body) == {"type": "error", "error": {"type": kind, "message": error.message}, "request_id": "req_1"}
    event = MESSAGES.error_event(error)
    assert event == b"event: error\ndata: " + orjson.dumps({"type": "error", "error": {"type": kind, "message": error.message}}) + b"\n\n"


def test_sticky_session_keys_in_order() -> None:
    parsed = MESSAGES.parse(orjson.dumps({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                                          "metadata": {"user_id": "u-1"}}), {})
    assert MESSAGES.session(parsed, {"x-session-id": "a", "x-claude-code-session-id": "b"}) == "a"
    assert MESSAGES.session(parsed, {"x-claude-code-session-id": "b"}) == "b"
    assert MESSAGES.session(parsed, {}) == "u-1"
    bare = MESSAGES.parse(b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}]}', {})
    assert MESSAGES.session(bare, {}) is None


def test_count_tokens_needs_no_max_tokens() -> None:
    parsed = COUNT_TOKENS.parse(b'{"model":"m","messages":[{"role":"user","content":"x"}]}', {"anthropic-beta": "b1"})
    assert (parsed.model, parsed.max_tokens, parsed.beta) == ("m", None, "b1")
    with pytest.raises(errors.GatewayError) as raised:
        MESSAGES.parse(b'{"model":"m","messages":[{"role":"user","content":"x"}]}', {})
    assert raised.value.param == "max_tokens"


@dataclass
class Outgoing:
    """The request as a provider reads it (`upstream.Outbound`)."""

    messages: MessagesRequest
    model: ModelConfig
    request_id: str = "req_1"
    chat: None = None


def prepared_body(provider: ProviderConfig, data: dict[str, Any], metrics: Metrics | None = None) -> dict[str, Any]:
    wrapped = MESSAGES.adapt(build(provider, metrics), metrics)
    assert isinstance(wrapped, ConvertedMessages)
    outgoing = Outgoing(MessagesRequest(data, version=None, beta=None), ModelConfig(name="m", targets=(Target(provider.name, "up"),)))
    parsed: dict[str, Any] = orjson.loads(wrapped.prepare(outgoing, "up").body)  # type: ignore[arg-type]
    return parsed


STREAM = {"model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}], "top_k": 5}


def test_openai_format_streams_ask_for_usage() -> None:
    body = prepared_body(ProviderConfig(name="o", type="openai", base_url="http://127.0.0.1:1/v1"), STREAM)
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "up"


def test_an_azure_api_version_without_stream_usage_gets_no_stream_options() -> None:
    old = ProviderConfig(name="az", type="azure", base_url="http://127.0.0.1:1/openai", api_version="2024-06-01")
    body = prepared_body(old, STREAM)
    assert "stream_options" not in body and body["stream"] is True  # B21: settled on the reservation
    current = ProviderConfig(name="az", type="azure", base_url="http://127.0.0.1:1/openai", api_version="2024-10-21")
    assert prepared_body(current, STREAM)["stream_options"] == {"include_usage": True}


def test_dropped_fields_are_counted_per_provider() -> None:
    metrics = Metrics(CollectorRegistry())
    prepared_body(ProviderConfig(name="o", type="openai", base_url="http://127.0.0.1:1/v1"), STREAM, metrics)
    assert metrics.registry.get_sample_value(
        "llm_proxy_conversion_dropped_params_total", {"provider": "o", "param": "top_k"}) == 1


def test_anthropic_providers_pass_through() -> None:
    provider = build(ProviderConfig(name="c", type="anthropic", base_url="http://127.0.0.1:1"), None)
    assert MESSAGES.adapt(provider) is provider.native_messages()
    mock = build(ProviderConfig(name="m", type="mock", imitate="anthropic"), None)
    assert MESSAGES.adapt(mock) is mock.native_messages() is not None
    assert isinstance(MESSAGES.adapt(build(ProviderConfig(name="m", type="mock"), None)), ConvertedMessages)
