"""Classification of upstream answers, 429 cool-down hints, headroom and OpenAI durations."""

from __future__ import annotations

from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from proxy.faults import (
    DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S, Fault, Headroom, Verdict, classify, parse_duration,
    read_headroom,
)

NOW = 1000.0
QUOTA_CODE = b'{"error": {"message": "quota", "type": "x", "code": "insufficient_quota"}}'
QUOTA_TYPE = b'{"error": {"message": "no", "type": "insufficient_quota", "code": null}}'
QUOTA_TOP = b'{"code": "insufficient_quota"}'
QUOTA_IN_MESSAGE = b'{"error": {"message": "not insufficient_quota really", "type": "rate_limit"}}'


@pytest.mark.parametrize(
    ("status", "body", "fault"),
    [
        (200, b"", Fault.NONE),
        (201, b"{}", Fault.NONE),
        (204, b"", Fault.NONE),
        (400, b"{}", Fault.CALLER),
        (404, b"not json", Fault.CALLER),
        (413, b"", Fault.CALLER),
        (422, b"[]", Fault.CALLER),
        (401, b"", Fault.QUARANTINE),
        (403, b'{"error": {}}', Fault.QUARANTINE),
        (402, b"", Fault.DISABLE),
        (429, QUOTA_CODE, Fault.DISABLE),
        (429, QUOTA_TYPE, Fault.DISABLE),
        (400, QUOTA_CODE, Fault.DISABLE),
        (403, QUOTA_TOP, Fault.DISABLE),
        (500, QUOTA_CODE, Fault.DISABLE),
        (429, QUOTA_IN_MESSAGE, Fault.COOLDOWN),
        (429, b'"insufficient_quota"', Fault.COOLDOWN),
        (429, b"insufficient_quota \xff\x00{", Fault.COOLDOWN),
        (429, b'{"error": "insufficient_quota"}', Fault.COOLDOWN),
        (429, b"", Fault.COOLDOWN),
        (500, b"", Fault.TRANSIENT),
        (502, b"<html>bad gateway</html>", Fault.TRANSIENT),
        (503, b"\xff\xfe", Fault.TRANSIENT),
        (529, b'{"type": "error", "error": {"type": "overloaded_error"}}', Fault.TRANSIENT),
        (405, b"", Fault.TRANSIENT),
        (408, b"", Fault.TRANSIENT),
        (409, b"", Fault.TRANSIENT),
        (415, b"", Fault.TRANSIENT),
        (301, b"", Fault.TRANSIENT),
        (100, b"", Fault.TRANSIENT),
        (200, QUOTA_CODE, Fault.NONE),  # a success body is never inspected
    ],
)
def test_classify(status: int, body: bytes, fault: Fault) -> None:
    verdict = classify(status, {}, body, NOW)
    assert verdict.fault is fault
    assert (verdict.until is not None) is (fault is Fault.COOLDOWN)


@pytest.mark.parametrize(
    ("status", "body", "shared"),
    [
        (529, b"", True),
        (529, b'{"type": "error", "error": {"type": "overloaded_error"}}', True),
        (503, b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}', True),
        (500, b'{"error": {"code": "overloaded_error"}}', True),
        (500, b"", False),
        (503, b'{"error": {"message": "overloaded_error is not our type here"}}', False),
        (502, b"overloaded_error", False),
        (400, b'{"error": {"type": "overloaded_error"}}', False),  # a caller fault is relayed
    ],
)
def test_only_whole_service_answers_are_shared_by_the_providers_accounts(
    status: int, body: bytes, shared: bool
) -> None:
    assert classify(status, {}, body, NOW).shared is shared


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (200, b"", ""),
        (401, b"secret sk-abc in body", "upstream 401"),
        (429, QUOTA_CODE, "upstream 429 insufficient_quota"),
        (402, b"", "upstream 402 insufficient_quota"),
        (503, b"a very long body " * 1000, "upstream 503"),
    ],
)
def test_reason_is_short_fixed_text(status: int, body: bytes, reason: str) -> None:
    assert classify(status, {}, body, NOW).reason == reason


HTTP_DATE = format_datetime(datetime.fromtimestamp(5_000_030.0, timezone.utc), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "wall_now", "wait"),
    [
        ({}, None, DEFAULT_COOLDOWN_S),
        ({"retry-after-ms": "1500"}, None, 1.5),
        ({"retry-after": "7"}, None, 7.0),
        ({"retry-after": "2.5"}, None, 2.5),
        ({"retry-after": "0"}, None, 0.0),
        ({"retry-after": "3", "retry-after-ms": "4500"}, None, 4.5),
        ({"retry-after": "9", "retry-after-ms": "4500"}, None, 9.0),
        ({"x-ratelimit-reset-requests": "1m30s"}, None, 90.0),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, None, 360.0),
        ({"retry-after": "2", "x-ratelimit-reset-tokens": "850ms"}, None, 2.0),
        (
            {
                "x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "20s",
                "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "2s",
            },
            None,
            2.0,
        ),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "20s"}, None,
         DEFAULT_COOLDOWN_S),
        ({"retry-after": "soon"}, None, DEFAULT_COOLDOWN_S),
        ({"retry-after": "-5"}, None, DEFAULT_COOLDOWN_S),
        ({"retry-after": "nan", "retry-after-ms": "inf"}, None, DEFAULT_COOLDOWN_S),
        ({"x-ratelimit-reset-tokens": "later"}, None, DEFAULT_COOLDOWN_S),
        ({"retry-after": "1e12"}, None, MAX_COOLDOWN_S),
        ({"retry-after": HTTP_DATE}, 5_000_000.0, 30.0),
        ({"retry-after": HTTP_DATE}, 5_000_100.0, 0.0),  # a date in the past: no wait
        ({"retry-after": HTTP_DATE}, None, DEFAULT_COOLDOWN_S),  # no wall clock: not a hint
        ({"retry-after": "Wed, 99 Foo 2015 07:28:00 GMT"}, 5_000_000.0, DEFAULT_COOLDOWN_S),
    ],
)
def test_429_cooldown(headers: dict[str, str], wall_now: float | None, wait: float) -> None:
    verdict = classify(429, headers, b"", NOW, wall_now=wall_now)
    expected = Verdict(Fault.COOLDOWN, until=pytest.approx(NOW + wait), reason="upstream 429")
    assert verdict == expected


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("850ms", 0.85),
        ("6s", 6.0),
        ("0.5s", 0.5),
        ("1m30s", 90.0),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1m500ms", 60.5),
        ("20us", 20e-6),
        ("3", 3.0),
        ("1.25", 1.25),
        (" 6s ", 6.0),
        ("", None),
        ("s", None),
        ("6x", None),
        ("-6s", None),
        ("6s garbage", None),
        ("1m30", None),
        ("nan", None),
        ("inf", None),
        ("-1", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    result = parse_duration(text)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("headers", "headroom"),
    [
        ({}, None),
        ({"x-ratelimit-reset-requests": "5s"}, None),
        ({"x-ratelimit-remaining-requests": "12"}, Headroom(12, None, 0.0)),
        (
            {"x-ratelimit-remaining-requests": "12", "x-ratelimit-remaining-tokens": "0",
             "x-ratelimit-reset-tokens": "6s", "x-ratelimit-reset-requests": "1m"},
            Headroom(12, 0, 6.0),
        ),
        (
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0",
             "x-ratelimit-reset-tokens": "6s", "x-ratelimit-reset-requests": "1m"},
            Headroom(0, 0, 60.0),
        ),
        ({"x-ratelimit-remaining-tokens": "0"}, Headroom(None, 0, DEFAULT_COOLDOWN_S)),
        ({"x-ratelimit-remaining-tokens": "lots"}, None),
    ],
)
def test_read_headroom(headers: dict[str, str], headroom: Headroom | None) -> None:
    assert read_headroom(headers) == headroom
