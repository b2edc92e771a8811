"""The `anthropic` provider type: Anthropic's Messages API behind the Chat Completions API.

Glue only: the request, answer, stream and error conversions are the pure functions of
`anthropic_request`, `anthropic_answer`, `anthropic_stream` and `anthropic_errors`; this module
sends to `{base_url}/v1/messages` with `x-api-key`, `anthropic-version` and `anthropic-beta`,
turns their failures into the seam's (`UpstreamFailure`, `InBandError`) and counts what the
conversion dropped or repaired. Clients of the Messages API are served by `native_messages()`,
the pass-through of `anthropic_passthrough`, on the same transport.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping

from ..config import AccountConfig, ProviderConfig
from ..faults import Verdict
from ..httpmessage import UpstreamFailure
from ..metrics import Metrics
from ..upstream import Answer, Around, Exchange, InBandError, Outbound, Prepared, StreamReader
from .anthropic_answer import from_anthropic
from .anthropic_passthrough import AnthropicPassThrough, anthropic_headers
from .anthropic_errors import caller_error, classify_anthropic, classify_in_band, upstream_request_id
from .anthropic_request import to_anthropic
from .anthropic_stream import AnthropicStream, AnthropicStreamError
from .transport import Carrier, Transport


class AnthropicProvider:
    """Converts both ways; `transport` is the mock's when it imitates Anthropic."""

    def __init__(
        self, config: ProviderConfig, *, metrics: Metrics | None = None, transport: Carrier | None = None
    ) -> None:
        self.config = config
        self._metrics = metrics
        self.transport = transport or Transport(
            config, auth=lambda key: b"x-api-key: " + key + b"\r\n", probe_path="/v1/models"
        )
        self._messages = self.transport.target("/v1/messages")
        self._headers = anthropic_headers(config, version=None, beta=None)
        self._native = AnthropicPassThrough(self)

    def prepare(self, call: Outbound, upstream_model: str) -> Prepared:
        chat, model = call.chat, call.model
        assert chat is not None and model is not None
        converted = to_anthropic(
            chat.data, model=upstream_model, caps=model.caps, default_max_tokens=model.default_max_tokens
        )
        if self._metrics is not None:
            for param in converted.dropped:
                self._metrics.conversion_dropped((self.config.name, param)).inc()
            for kind in converted.repairs:
                self._metrics.conversion_repairs((self.config.name, kind)).inc()
        return Prepared(
            body=converted.body, stream=converted.stream, include_usage=converted.include_usage,
            json_mode=converted.json_mode, headers=self._headers,
        )

    async def send(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange:
        return await self.transport.post(account, self._messages, prepared.body, request_id, prepared.headers)

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        return classify_anthropic(status, headers, body, now, wall_now=wall_now)

    def relay(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        relayed = {"Content-Type": "application/json"}
        request_id = upstream_request_id(headers, body)
        if request_id is not None:
            relayed["x-upstream-request-id"] = request_id
        return caller_error(status, body), relayed

    def answer(self, body: bytes, prepared: Prepared) -> Answer:
        converted = from_anthropic(body, created=int(time.time()), json_mode=prepared.json_mode)
        self._count_unknown(converted.unknown, converted.dropped_blocks)
        return Answer(body=converted.body, usage=converted.usage)

    def stream(self, prepared: Prepared) -> StreamReader:
        inner = AnthropicStream(
            include_usage=prepared.include_usage, created=int(time.time()), json_mode=prepared.json_mode
        )
        return _Stream(inner, self)

    async def probe(self, account: AccountConfig) -> bool:
        return await self.transport.probe(account)

    def native_messages(self) -> AnthropicPassThrough:
        return self._native

    async def close(self) -> None:
        await self.transport.close()

    def _count_unknown(self, unknown: Any, dropped_blocks: Any) -> None:
        if self._metrics is None:
            return
        for field, _ in unknown:  # the value is the upstream's: never a label
            self._metrics.conversion_unknown((self.config.name, field)).inc()
        for kind in dropped_blocks:
            self._metrics.conversion_dropped_blocks((self.config.name, kind)).inc()


class _Stream(Around):
    """`AnthropicStream` with its failures as the seam's: in-band errors classified, a malformed
    stream a bad response."""

    __slots__ = ("_stream", "_provider", "_counted")

    def __init__(self, inner: AnthropicStream, provider: AnthropicProvider) -> None:
        super().__init__(inner)
        self._stream = inner
        self._provider = provider
        self._counted = False

    def feed(self, chunk: bytes) -> bytes:
        inner = self._stream
        try:
            out = inner.feed(chunk)
        except AnthropicStreamError as exc:
            now = asyncio.get_running_loop().time()
            raise InBandError(classify_in_band(exc.verdict_status, exc.body(), now), str(exc)) from None
        except ValueError as exc:
            raise UpstreamFailure("bad_response", str(exc)) from None
        if inner.done and not self._counted:
            self._counted = True
            self._provider._count_unknown(inner.unknown, inner.dropped_blocks)
        return out
