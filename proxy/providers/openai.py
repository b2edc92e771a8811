"""The `openai` provider type: any OpenAI-compatible API at `base_url`, as pass-through.

The client's bytes go upstream (changed only where SPEC §3 says), the upstream's bytes come back
as they are: a JSON answer is only checked to be an object and read for its usage; a stream only
split into events, its usage chunk taken out when the gateway asked for it.
"""

from __future__ import annotations

from typing import Mapping

import orjson

from ..config import AccountConfig, ProviderConfig
from ..faults import Verdict, classify
from ..streaming import SseScanner
from ..upstream import Answer, Exchange, Outbound, Prepared, StreamReader
from .transport import Carrier, Transport, bearer


class OpenAIProvider:
    """Pass-through to an OpenAI-compatible `{base_url}/chat/completions`."""

    def __init__(self, config: ProviderConfig, *, transport: Carrier | None = None) -> None:
        self.config = config
        self.transport = transport or Transport(config, auth=bearer, probe_path="/models")
        self._chat = self.transport.target("/chat/completions")

    def prepare(self, call: Outbound, upstream_model: str) -> Prepared:
        chat = call.chat
        assert chat is not None
        body = call.upstream_request(upstream_model)
        return Prepared(body=body, stream=chat.stream, include_usage=chat.usage_requested)

    async def send(self, account: AccountConfig, prepared: Prepared, request_id: str) -> Exchange:
        return await self.transport.post(
            account, prepared.path or self._chat, prepared.body, request_id, prepared.headers
        )

    def classify(
        self, status: int, headers: Mapping[str, str], body: bytes, now: float, *, wall_now: float
    ) -> Verdict:
        return classify(status, headers, body, now, wall_now=wall_now)

    def relay(self, status: int, headers: Mapping[str, str], body: bytes) -> tuple[bytes, dict[str, str]]:
        return body, {"Content-Type": headers.get("Content-Type", "application/json")}

    def answer(self, body: bytes, prepared: Prepared) -> Answer:
        return Answer(body=body, usage=json_object(body).get("usage"))

    def stream(self, prepared: Prepared) -> StreamReader:
        return SseScanner(strip_usage=not prepared.include_usage)

    async def probe(self, account: AccountConfig) -> bool:
        return await self.transport.probe(account)

    def native_messages(self) -> None:
        return None  # Messages clients are converted to chat completions

    async def close(self) -> None:
        await self.transport.close()


def json_object(body: bytes) -> dict[str, object]:
    """`body` parsed, when it is a JSON object; ValueError otherwise."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if type(parsed) is not dict:
        raise ValueError("answer is not a JSON object")
    return parsed
