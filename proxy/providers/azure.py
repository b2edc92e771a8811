"""The `azure` provider type: Azure OpenAI as pass-through, with Azure's URL, auth and quirks.

The client's bytes go to `{base_url}/deployments/{target}/chat/completions?api-version=…` (with
`api_version: v1`, to `{base_url}/v1/chat/completions`, the deployment being the body's `model`)
with the key in `api-key`. Streams lose the content-filter chunks OpenAI never sends (reference
§5.4), and only events that may be one are parsed; everything else is the `openai` type's. A 429
cools by Azure's hints and a 404 fails over (§5.5). Knows nothing of the request path.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Mapping
from urllib.parse import quote


from ..config import ProviderConfig
from ..errors import unsupported_field
from ..faults import DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S, Fault, Verdict, classify, cooldown_seconds
from ..streaming import SseScanner, event_end, event_json, rewrite_events
from ..upstream import Outbound, Prepared, StreamReader
from .openai import OpenAIProvider
from .transport import Carrier, Transport

V1 = "v1"  # the api_version of Azure's version-less /v1 API
FIRST_STREAM_USAGE_VERSION = "2024-10-21"  # the first GA api-version known to take stream_options
# "... Please retry after 6 seconds." (Azure OpenAI); "Try again in 26 seconds." (its API gateway)
_WAIT_IN_MESSAGE = re.compile(rb"(?:retry after|try again in) (\d+(?:\.\d+)?) seconds?", re.IGNORECASE)
_DIMENSIONS = ("requests", "tokens")


def stream_usage(config: ProviderConfig) -> bool:
    """Whether `stream_options.include_usage` may be sent: as configured, else for v1 and the
    dated versions from 2024-10-21 (older ones answer 400 "Unrecognized request argument")."""
    if config.supports_stream_usage is not None:
        return config.supports_stream_usage
    return config.api_version == V1 or config.api_version[:10] >= FIRST_STREAM_USAGE_VERSION


def api_key(key: bytes) -> bytes:
    return b"api-key: " + key + b"\r\n"


class AzureProvider(OpenAIProvider):
    """Pass-through to one Azure OpenAI resource; `base_url` is its `https://{resource}.openai.azure.com/openai`.

    The probe of a quarantined account lists the resource's models (`GET {base_url}/models?api-version=…`,
    or `{base_url}/v1/models`): it needs a valid key and no deployment.
    """

    def __init__(self, config: ProviderConfig, *, transport: Carrier | None = None) -> None:
        self._v1 = config.api_version == V1
        self._stream_usage = stream_usage(config)
        self._query = "" if self._v1 else "?api-version=" + quote(config.api_version, safe="")
        probe = "/v1/models" if self._v1 else "/models" + self._query
        super().__init__(config, transport=transport or Transport(config, auth=api_key, probe_path=probe))
        self._v1_chat = self.transport.target("/v1/chat/completions")
        self._deployments: dict[str, bytes] = {}  # keyed by the config's target models: bounded

    def prepare(self, call: Outbound, upstream_model: str) -> Prepared:
        path = self._v1_chat if self._v1 else self._deployment(upstream_model)
        if self._stream_usage:
            return replace(super().prepare(call, upstream_model), path=path)
        chat = call.chat
        assert chat is not None
        if chat.usage_requested:
            raise unsupported_field(
                "stream_options", f"api_version {self.config.api_version} does not report a stream's usage."
            )
        # the stream is then settled on its reservation (SPEC §6: answered but unreported)
        body = call.upstream_request(upstream_model, ask_usage=False)
        return Prepared(body=body, stream=chat.stream, path=path)

    def _deployment(self, name: str) -> bytes:
        target = self._deployments.get(name)
        if target is None:
            path = f"/deployments/{quote(name, safe='')}/chat/completions{self._query}"
            target = self._deployments[name] = self.transport.target(path)
        return target

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        return classify_azure(status, headers, body, now, wall_now=wall_now)

    def stream(self, prepared: Prepared) -> StreamReader:
        return AzureStream(strip_usage=not prepared.include_usage)


class AzureStream(SseScanner):
    """An Azure stream as OpenAI would send it: `SseScanner` (usage read, the usage chunk taken
    out when the gateway asked for it), less Azure's filter chunks; the rest byte for byte."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:
        data = super().feed(chunk)
        return drop_filter_chunks(data) if data else data


def drop_filter_chunks(data: bytes) -> bytes:
    """`data` (whole events) without Azure's filter chunks; `data` itself when it holds none.

    An ordinary chunk is never parsed: only an event without a `"delta"` can be a filter chunk
    (OpenAI's chunks carry one in every choice; the usage chunk, which has none, has a usage).
    """
    size = len(data)
    if event_end(data, 0, size) == size:  # one event, the usual feed
        return data if _without_filter_chunk(data, 0, size) is None else b""
    return rewrite_events(data, _without_filter_chunk)


def _without_filter_chunk(data: bytes, start: int, end: int) -> bytes | None:
    if data.find(b'"delta"', start, end) < 0 and is_filter_chunk(event_json(data[start:end])):
        return b""
    return None


def is_filter_chunk(event: Any) -> bool:
    """Whether a parsed event is a chunk OpenAI never sends: no non-null `usage`, and `choices`
    empty (the prompt-filter event) or none with a `delta` or a finish (the asynchronous filter's
    offsets). Anything else, an error event included, is the client's."""
    if type(event) is not dict or event.get("usage") is not None:
        return False
    choices = event.get("choices")
    if type(choices) is not list:
        return False
    return all(
        type(choice) is dict and "delta" not in choice and choice.get("finish_reason") is None
        for choice in choices
    )


def classify_azure(
    status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float | None
) -> Verdict:
    """One Azure answer's fault class: OpenAI's (`faults.classify`; the prompt filter's 400 is the
    caller's), except that a 404 is a transient fault and a 429 cools by Azure's hints.

    A 404 cannot be the caller's: the gateway chose the path and the deployment (`DeploymentNotFound`
    is a deployment map that does not match the resource, or one created minutes ago). It fails
    over and counts on the account's breaker, whose half-open probes notice when the deployment
    appears; quarantine would bench the account's other models too, until a probe that a missing
    deployment does not fail.
    """
    if status == 404:
        missing = b"DeploymentNotFound" in body
        return Verdict(Fault.TRANSIENT, reason="azure 404 DeploymentNotFound" if missing else "azure 404")
    verdict = classify(status, headers, body, now, wall_now=wall_now)
    if verdict.fault is not Fault.COOLDOWN:
        return verdict
    wait = _header_wait(headers, wall_now)
    if wait is None:
        wait = _message_wait(body)
    if wait is None:
        if _is_quota(body):  # a quota spent for the month, not a rate: no wait would help
            return Verdict(Fault.DISABLE, reason="azure 429 quota exhausted")
        wait = DEFAULT_COOLDOWN_S
    return Verdict(Fault.COOLDOWN, until=now + wait, reason="azure 429")


def _header_wait(headers: Mapping[str, str], wall_now: float | None) -> float | None:
    """The wait `retry-after-ms`, `retry-after` or an exhausted dimension's `x-ratelimit-reset-*`
    (plain seconds on Azure, read like OpenAI's durations) name; None when none does."""
    named = "retry-after-ms" in headers or "retry-after" in headers or any(
        f"x-ratelimit-reset-{dimension}" in headers and _exhausted(headers.get(f"x-ratelimit-remaining-{dimension}"))
        for dimension in _DIMENSIONS
    )
    return cooldown_seconds(headers, wall_now) if named else None


def _exhausted(remaining: str | None) -> bool:
    """Whether a remaining-* leaves its reset-* a hint, as `cooldown_seconds` reads it."""
    try:
        return remaining is None or not float(remaining) > 0
    except ValueError:
        return True


def _message_wait(body: bytes) -> float | None:
    found = _WAIT_IN_MESSAGE.search(body)
    return min(MAX_COOLDOWN_S, float(found.group(1))) if found is not None else None


def _is_quota(body: bytes) -> bool:
    text = body.lower()
    return b"quota" in text and b"rate limit" not in text
