"""`Call`: the typed state of one request as it passes the pipeline's stages.

Each stage fills its own fields; nothing else carries request state. Holds no I/O.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson

from .chat_api import CHAT
from .clientapi import ClientApi, ClientRequest
from .config import KeyConfig, ModelConfig
from .jsonsplice import SpliceError, splice
from .messages_validation import MessagesRequest
from .periods import Period
from .ratelimit import MAX_TOKENS, Grant
from .validation import ChatRequest

log = logging.getLogger("llm_proxy.call")

if TYPE_CHECKING:
    from .account import Account
    from .gateway import Gateway


class Call:
    __slots__ = (
        "gateway",
        "request_id",
        "started",
        "key",
        "api",
        "parsed",
        "model",
        "body",
        "session",
        "attempts",
        "tried",
        "provider",
        "provider_type",
        "account",
        "status",
        "error_type",
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "cache_write_tokens",
        "served_model",
        "period",
        "cost_nano",
        "first_byte_at",
        "upstream_s",
        "ended_by_shutdown",
        "last_outcome",
        "extra_headers",
        "grants",
        "reserved",
        "guardrails",
        "_forwarded",
    )

    def __init__(
        self, *, gateway: Gateway, request_id: str, started: float, api: ClientApi = CHAT
    ) -> None:
        self.gateway = gateway
        self.request_id = request_id
        self.started = started  # time.perf_counter(): every duration of a call is measured on it
        self.key: KeyConfig | None = None
        self.api = api  # the API the client speaks
        self.parsed: ClientRequest | None = None  # its validated body
        self.model: ModelConfig | None = None
        self.body = b""
        self.session: str | None = None
        self.attempts = 0
        self.tried: list[Account] = []
        self.provider: str | None = None
        self.provider_type: str | None = None  # the protocol the upstream spoke (SPEC §9)
        self.account: str | None = None
        self.status = 0
        self.error_type: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens = 0  # cache reads, part of prompt_tokens
        self.cache_write_tokens = 0  # cache writes (Anthropic), part of prompt_tokens
        self.served_model: ModelConfig | None = None  # the model (or fallback) last tried: its price applies
        self.period: Period | None = None  # the budget period it was admitted in: what it is charged to
        self.cost_nano: int | None = None  # set at settlement; None when unpriced
        self.first_byte_at: float | None = None
        self.upstream_s = 0.0
        self.ended_by_shutdown = False
        self.last_outcome = ""
        self.extra_headers: dict[str, str] = {}  # rate-limit headers, on every answer
        self.grants: list[Grant] = []  # limiter holdings, settled once at the end
        self.reserved = 0  # tokens reserved at admission
        self.guardrails: list[str] = []  # names of the guardrails that acted, for the access log
        self._forwarded: dict[tuple[str, bool], bytes] = {}

    @property
    def chat(self) -> ChatRequest | None:
        parsed = self.parsed
        return parsed if type(parsed) is ChatRequest else None

    @property
    def messages(self) -> MessagesRequest | None:
        parsed = self.parsed
        return parsed if type(parsed) is MessagesRequest else None

    def response_headers(self, headers: dict[str, str]) -> dict[str, str]:
        """`headers` plus what every answer carries: the request id and rate-limit state."""
        headers["x-request-id"] = self.request_id
        if self.extra_headers:
            headers.update(self.extra_headers)
        return headers

    def upstream_request(self, upstream_model: str, *, ask_usage: bool = True) -> bytes:
        """The body to send for `upstream_model`: the client's bytes unless something must change.

        Changes only the model name, drops `request_id`, and asks for usage on streams (unless
        `ask_usage` is false: an upstream that refuses the field), splicing those members into
        the client's bytes (every other member reaches the upstream byte for byte).
        """
        chat = self.chat
        assert chat is not None
        add_usage = ask_usage and chat.stream and not chat.usage_requested
        # a null `request_id` is absent to the gateway, but an upstream would still see the field
        if upstream_model == chat.model and "request_id" not in chat.data and not add_usage:
            return self.body
        cached = self._forwarded.get((upstream_model, add_usage))
        if cached is not None:
            return cached
        try:
            body = splice(
                self.body,
                values={"model": orjson.dumps(upstream_model)},
                drop=("request_id",),
                nested={"stream_options": {"include_usage": b"true"}} if add_usage else {},
            )
        except SpliceError as exc:
            # orjson accepted this body and msgspec did not: still forward it, re-encoded
            log.warning("request %s re-encoded: %s", self.request_id, exc)
            data = dict(chat.data)
            data["model"] = upstream_model
            data.pop("request_id", None)
            if add_usage:
                data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
            body = orjson.dumps(data)
        self._forwarded[upstream_model, add_usage] = body
        return body

    def upstream_messages(self, upstream_model: str) -> bytes:
        """The client's Messages request for `upstream_model`: its bytes, only `model` spliced in
        when the name differs (thinking signatures and number formats survive byte for byte)."""
        messages = self.messages
        assert messages is not None
        if upstream_model == messages.model:
            return self.body
        cached = self._forwarded.get((upstream_model, False))
        if cached is None:
            try:
                cached = splice(self.body, values={"model": orjson.dumps(upstream_model)})
            except SpliceError as exc:
                log.warning("request %s re-encoded: %s", self.request_id, exc)
                cached = orjson.dumps({**messages.data, "model": upstream_model})
            self._forwarded[upstream_model, False] = cached
        return cached

    def record_usage(self, usage: Any) -> None:
        """Takes an upstream's `usage` figures. They are untrusted input: a figure that is not a
        plausible token count is left out (the request is then charged its reservation)."""
        if type(usage) is not dict:
            return
        prompt = _reported(usage, "prompt_tokens", self.request_id)
        completion = _reported(usage, "completion_tokens", self.request_id)
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion
        details = usage.get("prompt_tokens_details")
        if type(details) is dict:
            self.cached_tokens = _reported(details, "cached_tokens", self.request_id) or 0
            self.cache_write_tokens = _reported(details, "cache_write_tokens", self.request_id) or 0


def _reported(usage: dict[str, Any], name: str, request_id: str) -> int | None:
    value = usage.get(name)
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value
    if value is not None:
        log.warning("upstream reported an implausible %s; ignored (request %s)", name, request_id)
    return None
