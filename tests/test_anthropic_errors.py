"""classify_anthropic, classify_in_band and caller_error on Anthropic error answers (reference
§4, §0.6; SPEC §9)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
import pytest

from proxy.faults import DEFAULT_COOLDOWN_S, Fault, Verdict
from proxy.providers.anthropic_errors import ERROR_STATUSES, caller_error, classify_anthropic, classify_in_band, upstream_request_id
from proxy.providers.anthropic_stream import AnthropicStreamError

NOW, WALL = 1000.0, 1_700_000_000.0
SECRET = "sk-ant-secret-in-message"


def body(kind: str, message: str = f"details {SECRET}", **error: Any) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message, **error}, "request_id": "req_011"})


def iso(seconds_from_wall: float) -> str:
    return datetime.fromtimestamp(WALL + seconds_from_wall, timezone.utc).isoformat().replace("+00:00", "Z")


def exhausted(dimension: str, reset_in: float, remaining: str = "0") -> dict[str, str]:
    return {f"anthropic-ratelimit-{dimension}-remaining": remaining, f"anthropic-ratelimit-{dimension}-reset": iso(reset_in)}


CASES: dict[str, tuple[int, dict[str, str], bytes, Fault, float | None, bool]] = {
    "200": (200, {}, b"{}", Fault.NONE, None, False),
    "400 invalid_request_error: the caller's": (400, {}, body("invalid_request_error"), Fault.CALLER, None, False),
    "400 spend limit: the account's": (400, {}, body("invalid_request_error", "You have reached your specified workspace spend limit"), Fault.DISABLE, None, False),
    "413 from Cloudflare, not JSON": (413, {}, b"<html>413 Request Entity Too Large</html>", Fault.CALLER, None, False),
    "401": (401, {}, body("authentication_error"), Fault.QUARANTINE, None, False),
    "403 from the API": (403, {}, body("permission_error"), Fault.QUARANTINE, None, False),
    "403 from a WAF": (403, {}, b"<html>Forbidden</html>", Fault.TRANSIENT, None, False),
    "402": (402, {}, body("billing_error"), Fault.DISABLE, None, False),
    "billing_error at 400": (400, {}, body("billing_error"), Fault.DISABLE, None, False),
    "404: the model map's fault, failed over": (404, {}, body("not_found_error"), Fault.TRANSIENT, None, False),
    "409": (409, {}, body("conflict_error"), Fault.TRANSIENT, None, False),
    "422": (422, {}, body("invalid_request_error"), Fault.TRANSIENT, None, False),
    "429 retry-after": (429, {"retry-after": "7"}, body("rate_limit_error"), Fault.COOLDOWN, NOW + 7, False),
    "429 HTTP-date retry-after": (429, {"retry-after": "Tue, 14 Nov 2023 22:13:40 GMT"}, body("rate_limit_error"), Fault.COOLDOWN, NOW + 20, False),
    "429 retry-after beats the reset": (429, {"retry-after": "3", **exhausted("tokens", 50)}, body("rate_limit_error"), Fault.COOLDOWN, NOW + 3, False),
    "429 reset of the exhausted dimension": (429, {**exhausted("tokens", 30), **exhausted("requests", 90, "12")}, body("rate_limit_error"), Fault.COOLDOWN, NOW + 30, False),
    "429 latest of two exhausted": (429, {**exhausted("input-tokens", 30), **exhausted("output-tokens", 45)}, body("rate_limit_error"), Fault.COOLDOWN, NOW + 45, False),
    "429 x-ratelimit-reset": (429, {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6s"}, body("rate_limit_error"), Fault.COOLDOWN, NOW + 6, False),
    "429 exhausted, unreadable reset": (429, {"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": "soon"}, body("rate_limit_error"), Fault.COOLDOWN, NOW + DEFAULT_COOLDOWN_S, False),
    "429 neither: a spend cap": (429, {}, body("rate_limit_error"), Fault.QUARANTINE, None, False),
    "429 nothing exhausted: a spend cap": (429, exhausted("tokens", 30, "500"), body("rate_limit_error"), Fault.QUARANTINE, None, False),
    "429 enforced_spend_limit_reached": (429, {"retry-after": "5"}, body("rate_limit_error", details={"error_code": "enforced_spend_limit_reached"}), Fault.QUARANTINE, None, False),
    "500": (500, {}, body("api_error"), Fault.TRANSIENT, None, False),
    "503 not JSON": (503, {}, b"upstream connect error", Fault.TRANSIENT, None, False),
    "504": (504, {}, body("timeout_error"), Fault.TRANSIENT, None, False),
    "529: shared by every account": (529, {}, body("overloaded_error"), Fault.TRANSIENT, None, True),
    "overloaded_error at 500: shared": (500, {}, body("overloaded_error"), Fault.TRANSIENT, None, True),
}


@pytest.mark.parametrize(("status", "headers", "payload", "fault", "until", "shared"), CASES.values(), ids=CASES.keys())
def test_classify(status: int, headers: dict[str, str], payload: bytes, fault: Fault, until: float | None, shared: bool) -> None:
    verdict = classify_anthropic(status, headers, payload, NOW, wall_now=WALL)
    assert (verdict.fault, verdict.shared) == (fault, shared)
    assert verdict.until == pytest.approx(until) if until is not None else verdict.until is None
    assert SECRET not in verdict.reason and len(verdict.reason) < 40


def test_an_rfc3339_reset_needs_wall_time() -> None:
    verdict = classify_anthropic(429, exhausted("tokens", 30), body("rate_limit_error"), NOW, wall_now=None)
    assert verdict == Verdict(Fault.COOLDOWN, until=NOW + DEFAULT_COOLDOWN_S, reason=verdict.reason)


IN_BAND = {
    "overloaded_error": (Fault.TRANSIENT, True),
    "api_error": (Fault.TRANSIENT, False),
    "rate_limit_error": (Fault.COOLDOWN, False),  # no headers in a stream: the default wait, not a spend cap
    "invalid_request_error": (Fault.CALLER, False),
    "authentication_error": (Fault.QUARANTINE, False),
    "some_future_error": (Fault.TRANSIENT, False),
}


@pytest.mark.parametrize(("kind", "expected"), IN_BAND.items(), ids=IN_BAND.keys())
def test_an_in_band_error_classifies_as_the_status_its_type_stands_for(kind: str, expected: tuple[Fault, bool]) -> None:
    error = AnthropicStreamError(ERROR_STATUSES.get(kind, 500), kind, "boom")
    verdict = classify_in_band(error.verdict_status, error.body(), NOW)
    assert (verdict.fault, verdict.shared) == expected
    if verdict.fault is Fault.COOLDOWN:
        assert verdict.until == NOW + DEFAULT_COOLDOWN_S


def test_caller_error_carries_the_upstream_message_verbatim_in_openai_shape() -> None:
    relayed = orjson.loads(caller_error(400, body("invalid_request_error", "messages.1: text content blocks must be non-empty")))
    assert relayed == {"error": {"message": "messages.1: text content blocks must be non-empty",
                                 "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}}


@pytest.mark.parametrize("payload", [b"<html>413 Request Entity Too Large</html>", b"", b"{not json", b'{"error": "flat"}', b"[1]"])
def test_caller_error_survives_a_body_that_is_not_anthropic_json(payload: bytes) -> None:
    relayed = orjson.loads(caller_error(413, payload))["error"]
    assert set(relayed) == {"message", "type", "param", "code"}
    assert (relayed["type"], relayed["code"]) == ("invalid_request_error", "request_too_large")
    assert "413" in relayed["message"]


def test_the_upstream_request_id_from_the_header_else_the_body_and_only_if_header_safe() -> None:
    assert upstream_request_id({"request-id": "req_abc"}, b"") == "req_abc"
    assert upstream_request_id({}, body("api_error")) == "req_011"
    assert upstream_request_id({"request-id": "req\r\nx-evil: 1"}) is None
    assert upstream_request_id({}, b"<html>") is None
