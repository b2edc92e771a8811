"""The `gemini` provider type: Gemini's OpenAI-compatible endpoint (`.../v1beta/openai`) as
pass-through, its answers normalised where Gemini strays from OpenAI (reference §6.1, B23).

The bytes are the `openai` type's, changed only where Gemini strays: `finish_reason` is
`tool_calls` when the answer calls tools, tool calls get their `index` (one ordinal per call) and
an `id` when Gemini's is empty, a list-wrapped error `[{"error": …}]` is unwrapped, and Google's
error `status` (RESOURCE_EXHAUSTED, UNAVAILABLE, …) classifies a refusal (§6.2). In a stream only
events that may need a change are parsed, and only changed ones re-encoded.
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping

import orjson

from ..errors import GatewayError
from ..faults import DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S, Fault, Verdict, classify, cooldown_seconds, parse_duration
from ..streaming import SseScanner, event_json, rewrite_events
from ..upstream import Answer, Prepared, StreamReader
from .openai import OpenAIProvider, json_object

# "You exceeded your current quota" with no RetryInfo is a daily or plan quota, spent until Google
# resets it (at midnight Pacific): looking again hourly costs one failed-over attempt an hour.
QUOTA_COOLDOWN_S = 3600.0
MAX_ERROR_PARSE = 1 << 20
_CALLER_STATUSES = frozenset({"INVALID_ARGUMENT", "OUT_OF_RANGE"})
# FAILED_PRECONDITION is the project's state ("free tier is not available in your country,
# enable billing"): another account may serve, this one will not until its operator acts.
_ACCOUNT_STATUSES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION"})
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"


class GeminiProvider(OpenAIProvider):
    """Pass-through to `{base_url}/chat/completions` with `Authorization: Bearer`; the probe of a
    quarantined account lists the models (`GET {base_url}/models`), as for the openai type."""

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        return classify_gemini(status, headers, body, now, wall_now=wall_now)

    def relay(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        error, wrapped = google_error(body)
        if error is None or not wrapped:
            return super().relay(status, headers, body)
        return openai_error(status, error), {"Content-Type": "application/json"}

    def answer(self, body: bytes, prepared: Prepared) -> Answer:
        document = json_object(body)
        if body.find(b'"tool_calls"') >= 0 and normalise_answer(document):
            body = orjson.dumps(document)
        return Answer(body=body, usage=document.get("usage"))

    def stream(self, prepared: Prepared) -> StreamReader:
        return GeminiStream(strip_usage=not prepared.include_usage)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def normalise_answer(document: dict[str, Any]) -> bool:
    """Fixes a chat.completion in place: a choice whose message calls tools finishes with
    `tool_calls`, and each call has an id. Whether anything changed."""
    changed = False
    choices = document.get("choices")
    for choice in choices if type(choices) is list else ():
        message = choice.get("message") if type(choice) is dict else None
        calls = message.get("tool_calls") if type(message) is dict else None
        if type(calls) is not list or not calls:
            continue
        for call in calls:
            if type(call) is dict and not call.get("id"):
                call["id"] = new_call_id()
                changed = True
        if choice.get("finish_reason") == "stop":
            choice["finish_reason"] = "tool_calls"
            changed = True
    return changed


class ToolCalls:
    """The tool calls one choice of a stream has started, in order: ordinal i has id `ids[i]`."""

    __slots__ = ("ids", "_ordinals")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._ordinals: dict[str, int] = {}  # Gemini's own non-empty ids

    def place(self, call: dict[str, Any]) -> bool:
        """Gives a tool-call fragment its call's ordinal as `index`, and its id where Gemini's is
        empty; whether the fragment changed. A new id, or a name without an id, starts a call
        (Gemini sends each call whole); a fragment with neither continues the last one."""
        before = (call.get("index"), call.get("id"))
        given = call.get("id")
        function = call.get("function")
        named = type(function) is dict and bool(function.get("name"))
        if type(given) is str and given:
            ordinal = self._ordinals.get(given)
            if ordinal is None:
                ordinal = self._ordinals[given] = self._start(given)
        elif named or not self.ids:
            ordinal = self._start(new_call_id())
            call["id"] = self.ids[ordinal]
        else:
            ordinal = len(self.ids) - 1
            if "id" in call:
                call["id"] = self.ids[ordinal]
        call["index"] = ordinal
        return (call.get("index"), call.get("id")) != before

    def _start(self, call_id: str) -> int:
        self.ids.append(call_id)
        return len(self.ids) - 1


class GeminiStream(SseScanner):
    """A Gemini stream as OpenAI would send it: `SseScanner` (usage read, the usage chunk taken out
    when the gateway asked for it), with tool calls indexed and identified, and the `stop` of a
    choice that called tools turned into `tool_calls`. Other events pass byte for byte, unparsed."""

    __slots__ = ("_calls",)

    def __init__(self, *, strip_usage: bool) -> None:
        super().__init__(strip_usage=strip_usage)
        self._calls: dict[int, ToolCalls] = {}  # by choice index, once that choice called a tool

    def feed(self, chunk: bytes) -> bytes:
        data = super().feed(chunk)
        if not data or not self._may_change(data, 0, len(data)):
            return data
        return rewrite_events(data, self._rewrite)

    def _may_change(self, data: bytes, start: int, end: int) -> bool:
        return data.find(b'"tool_calls"', start, end) >= 0 or (
            bool(self._calls) and data.find(b'"stop"', start, end) >= 0
        )

    def _rewrite(self, data: bytes, start: int, end: int) -> bytes | None:
        if not self._may_change(data, start, end):
            return None
        event = event_json(data[start:end])
        if type(event) is not dict or not self._normalise(event):
            return None
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def _normalise(self, chunk: dict[str, Any]) -> bool:
        """Fixes one chat.completion.chunk in place; whether anything changed."""
        changed = False
        choices = chunk.get("choices")
        for choice in choices if type(choices) is list else ():
            if type(choice) is not dict:
                continue
            index = choice.get("index")
            key = index if type(index) is int else 0
            delta = choice.get("delta")
            calls = delta.get("tool_calls") if type(delta) is dict else None
            if type(calls) is list and calls:
                seen = self._calls.setdefault(key, ToolCalls())
                for call in calls:
                    if type(call) is dict and seen.place(call):
                        changed = True
            if choice.get("finish_reason") == "stop" and key in self._calls:
                choice["finish_reason"] = "tool_calls"
                changed = True
        return changed


def google_error(body: bytes) -> tuple[dict[str, Any] | None, bool]:
    """Google's error object in `body`, and whether it came wrapped in a list (`[{"error": …}]`);
    (None, False) for any other body (an HTML page, an OpenAI-shaped one without `error`, …)."""
    if body.lstrip()[:1] not in (b"{", b"[") or len(body) > MAX_ERROR_PARSE:
        return None, False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, False
    wrapped = type(document) is list
    if wrapped:
        document = document[0] if document else None
    error = document.get("error") if type(document) is dict else None
    return (error, wrapped) if type(error) is dict else (None, False)


def openai_error(status: int, error: dict[str, Any]) -> bytes:
    """A Google error object as OpenAI's error body: its message, its `status` as the code."""
    message = error.get("message")
    if type(message) is not str:
        message = f"The upstream provider refused the request (status {status})."
    code = error.get("status")
    return GatewayError(status, "invalid_request_error", code if type(code) is str else "invalid_request_error", message).body()


def classify_gemini(
    status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float | None
) -> Verdict:
    """One Gemini answer's fault class, by Google's `status` where the body has one (§6.2), else
    OpenAI's (`faults.classify`). A 404 is the model map's fault, not the caller's: the gateway
    named the model, so it fails over (a transient fault), as for Anthropic's."""
    if 200 <= status < 300:
        return Verdict(Fault.NONE)
    error, _ = google_error(body)
    kind = error.get("status") if error is not None else None
    if kind == "INVALID_ARGUMENT" and _has_reason(error, "API_KEY_INVALID"):
        return Verdict(Fault.QUARANTINE, reason="gemini API_KEY_INVALID")
    if kind in _CALLER_STATUSES and status in (400, 413, 422):
        return Verdict(Fault.CALLER, reason=f"gemini {kind}")
    if kind in _ACCOUNT_STATUSES:
        return Verdict(Fault.QUARANTINE, reason=f"gemini {kind}")
    if kind == "RESOURCE_EXHAUSTED" or status == 429:
        return Verdict(Fault.COOLDOWN, until=now + _rate_limit_wait(headers, error, wall_now), reason="gemini 429")
    if kind == "NOT_FOUND" or status == 404:
        return Verdict(Fault.TRANSIENT, reason="gemini 404 model not served")
    if kind == "UNAVAILABLE":  # "The model is overloaded": the whole service says so
        return Verdict(Fault.TRANSIENT, reason="gemini UNAVAILABLE", shared=True)
    return classify(status, headers, body, now, wall_now=wall_now)


def _rate_limit_wait(headers: Mapping[str, str], error: dict[str, Any] | None, wall_now: float | None) -> float:
    """RetryInfo's `retryDelay`, else `retry-after(-ms)`, else a quota's hour or the default."""
    wait = _retry_delay(error)
    if wait is None and ("retry-after" in headers or "retry-after-ms" in headers):
        wait = cooldown_seconds(headers, wall_now)
    if wait is None:
        wait = QUOTA_COOLDOWN_S if _quota_spent(error) else DEFAULT_COOLDOWN_S
    return min(MAX_COOLDOWN_S, wait)


def _details(error: dict[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    details = error.get("details") if error is not None else None
    if type(details) is not list:
        return []
    return [detail for detail in details if type(detail) is dict and detail.get("@type") == kind]


def _has_reason(error: dict[str, Any] | None, reason: str) -> bool:
    details = error.get("details") if error is not None else None
    return type(details) is list and any(type(d) is dict and d.get("reason") == reason for d in details)


def _retry_delay(error: dict[str, Any] | None) -> float | None:
    for detail in _details(error, _RETRY_INFO):
        delay = detail.get("retryDelay")
        if type(delay) is str and (seconds := parse_duration(delay)) is not None:
            return seconds
    return None


def _quota_spent(error: dict[str, Any] | None) -> bool:
    message = error.get("message") if error is not None else None
    if type(message) is str and "exceeded your current quota" in message:
        return True
    for detail in _details(error, _QUOTA_FAILURE):
        violations = detail.get("violations")
        for violation in violations if type(violations) is list else ():
            quota = violation.get("quotaId") if type(violation) is dict else None
            if type(quota) is str and "PerDay" in quota:
                return True
    return False
