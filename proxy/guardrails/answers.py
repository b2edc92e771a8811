"""The response side's two hooks in `forward`: a JSON answer's body, and a stream's reader.

Both find the key's and model's guardrails with `apply_to: [response]` (redact or log only);
without any, the answer's bytes and the provider's reader pass through untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from ..upstream import StreamReader
from .extract import ANSWER_ROOTS, answer_segments
from .prefilter import maybe
from .redact import with_texts
from .rules import Hit, Scan
from .stage import record, redactions
from .stream import GuardedStream

if TYPE_CHECKING:
    from ..call import Call


def _response_scan(call: Call) -> Scan | None:
    if call.key is None or call.model is None:
        return None
    plan = call.gateway.guardrails.plan(call.key, call.model)
    return plan.response if plan is not None else None


def guard_answer(call: Call, body: bytes, api: str = "chat") -> bytes:
    """A JSON answer (`api` "chat": OpenAI's choices, "messages": Anthropic's content blocks)
    with the response guardrails applied: the same bytes unless something was redacted."""
    scan = _response_scan(call)
    if scan is None:
        return body
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if type(data) is not dict or scan.bits is not None and not maybe(data, ANSWER_ROOTS[api], scan.bits):
        return body
    segments = answer_segments(api, data)
    texts = [segment.text.encode() for segment in segments]
    hits = scan.hits(texts) if texts else []
    if not hits:
        return body
    record(call, hits)
    edits = redactions(hits, segments, texts)
    return orjson.dumps(with_texts(data, edits)) if edits else body


def guard_stream(call: Call, reader: StreamReader, api: str = "chat") -> StreamReader:
    """`reader` itself, or a reader holding events back to redact or log what the response
    guardrails find in the stream (OpenAI chunks for "chat", Anthropic events for "messages")."""
    scan = _response_scan(call)
    if scan is None:
        return reader

    def found(hits: list[Hit]) -> None:
        record(call, hits)

    return GuardedStream(reader, scan, api, found)
