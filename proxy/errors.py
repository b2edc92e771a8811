"""`GatewayError`, the one exception that reaches the edge, and its OpenAI-shaped rendering.

Every error the gateway itself produces is built here, so status, type and code stay consistent.
Imports nothing of the app.
"""

from __future__ import annotations

import math
from typing import Any

import orjson


class GatewayError(Exception):
    """An answer the gateway gives instead of the upstream's: status, OpenAI type and code."""

    __slots__ = ("status", "type", "code", "message", "param", "retry_after_s", "extra")

    def __init__(
        self,
        status: int,
        type: str,
        code: str,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s
        self.extra = extra  # further members of the error object, after the four (any renderer's)

    def body(self) -> bytes:
        """The OpenAI error object, all four keys present, then `extra`'s members."""
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.extra:
            error.update(self.extra)
        return orjson.dumps({"error": error})

    def sse_event(self) -> bytes:
        """The terminal event of a stream that already started."""
        return b"data: " + self.body() + b"\n\n"

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        seconds = max(1, math.ceil(self.retry_after_s))
        return {
            "Retry-After": str(seconds),
            "retry-after-ms": str(max(1, math.ceil(self.retry_after_s * 1000))),
        }


def invalid(code: str, message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request_error", code, message, param=param)


def unsupported_field(param: str, message: str) -> GatewayError:
    """A field the gateway, or the upstream it would go to, cannot express (SPEC §4, §9)."""
    return invalid("unsupported_field", message, param)


def invalid_value(param: str, message: str) -> GatewayError:
    return invalid("invalid_value", message, param)


def malformed_request(detail: str) -> GatewayError:
    """Not a valid HTTP/1.1 request, or a body that cannot be decoded; `detail` names no bytes."""
    return invalid("malformed_request", f"The request is malformed: {detail}.")


def unknown_route(method: str, path: str) -> GatewayError:
    return GatewayError(
        404, "invalid_request_error", "unknown_route", f"Invalid URL ({method} {_quoted(path)})."
    )


def method_not_allowed(method: str, path: str) -> GatewayError:
    return GatewayError(
        405,
        "invalid_request_error",
        "method_not_allowed",
        f"{_quoted(path)} does not accept {method}.",
    )


def _quoted(path: str) -> str:
    """A client's path, short and ASCII: it may hold anything, undecodable bytes included."""
    return path[:200].encode("ascii", "backslashreplace").decode("ascii")


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401, "authentication_error", "invalid_api_key", "Invalid or missing API key."
    )


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        "invalid_request_error",
        "model_not_found",
        f"The model `{model}` does not exist.",
        param="model",
    )


def model_not_allowed(model: str) -> GatewayError:
    return GatewayError(
        403,
        "permission_error",
        "model_not_allowed",
        f"This API key may not use the model `{model}`.",
        param="model",
    )


def model_not_chat(model: str, kind: str) -> GatewayError:
    return GatewayError(
        422,
        "invalid_request_error",
        "model_not_chat",
        f"The model `{model}` is a {kind} model, not a chat model.",
        param="model",
    )


def request_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        "invalid_request_error",
        "request_too_large",
        f"Request body exceeds {limit} bytes.",
    )


def body_timeout(idle_s: float) -> GatewayError:
    return GatewayError(
        408, "invalid_request_error", "request_timeout",
        f"The request body paused for more than {idle_s:g}s.",
    )


def draining() -> GatewayError:
    return GatewayError(
        503,
        "service_unavailable",
        "draining",
        "The gateway is shutting down; retry on another replica.",
        retry_after_s=1,
    )


def no_account_available(retry_after_s: float = 1) -> GatewayError:
    return GatewayError(
        503,
        "service_unavailable",
        "no_account_available",
        "No upstream account is available to serve this request.",
        retry_after_s=retry_after_s,
    )


def circuit_open(retry_after_s: float) -> GatewayError:
    return GatewayError(
        503,
        "service_unavailable",
        "circuit_open",
        "Provider circuit breaker open",
        retry_after_s=retry_after_s,
    )


def upstream_unreachable() -> GatewayError:
    return GatewayError(
        502, "upstream_error", "upstream_unreachable", "Could not connect to the upstream provider."
    )


def bad_upstream_response(detail: str) -> GatewayError:
    return GatewayError(
        502,
        "upstream_error",
        "bad_upstream_response",
        f"The upstream provider gave a bad response: {detail}.",
    )


def upstream_timeout(detail: str) -> GatewayError:
    return GatewayError(
        504, "timeout_error", "upstream_timeout", f"The upstream provider timed out: {detail}."
    )


def admin_disabled() -> GatewayError:
    return GatewayError(
        404, "invalid_request_error", "not_found", "The admin API is disabled (no server.admin_key)."
    )


def internal_error() -> GatewayError:
    return GatewayError(
        500, "server_error", "internal_error", "The gateway failed to handle this request."
    )


def rate_limited(param: str, retry_after_s: float) -> GatewayError:
    """A key/model/account bucket is empty; `param` is `<scope>.<dimension>`, e.g. `key.rpm`."""
    return GatewayError(
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        f"Rate limit exceeded ({param}); retry after {max(1, math.ceil(retry_after_s))}s.",
        param=param,
        retry_after_s=retry_after_s,
    )


def budget_exhausted(budget: str = "tokens", period: str = "total") -> GatewayError:
    """The key's `budget` ("tokens" | "usd") is spent for its `period` (budget_period)."""
    what = "money budget (budget_usd)" if budget == "usd" else "token budget"
    when = "" if period == "total" else f" for this {_PERIOD_NOUNS.get(period, period)}"
    return GatewayError(
        402,
        "insufficient_quota",
        "budget_exhausted",
        f"This API key has used up its {what}{when}.",
    )


_PERIOD_NOUNS = {"daily": "day", "weekly": "week", "monthly": "month"}


def usage_unavailable() -> GatewayError:
    return GatewayError(
        503, "service_unavailable", "usage_unavailable",
        "Usage is kept in Redis, which cannot be reached; try again shortly.", retry_after_s=1.0,
    )


def ratelimit_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "service_unavailable",
        "ratelimit_unavailable",
        "Rate limits cannot be checked right now; retry shortly.",
        retry_after_s=1,
    )


def guardrail_block(guardrail: str, findings: list[dict[str, str]]) -> GatewayError:
    """A guardrail blocked the request (SPEC §11); `findings` name categories and locations,
    never the matched text."""
    return GatewayError(
        400,
        "guardrail_block",
        "guardrail_block",
        "Content blocked by guardrail",
        extra={"guardrail_key": guardrail, "action": "block", "findings": findings},
    )
