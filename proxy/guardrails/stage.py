"""The guardrail stage of the request path (after authorization, before admission) and its
accounting: findings counted per guardrail, category and action, the acting guardrails named
for the access log, a block raised as the 400 `guardrail_block`. Never records matched text.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from .. import errors
from .extract import REQUEST_ROOTS, Segment, request_segments
from .prefilter import maybe
from .redact import redact_text, with_texts
from .rules import Hit, Scan

if TYPE_CHECKING:
    from ..call import Call

# Bodies larger than this are scanned in a worker thread (the prefilter reads their large texts
# without the GIL), so that a huge prompt never holds the event loop (and the other requests on
# it) for the whole scan.
OFFLOAD_BYTES = 64 * 1024
# A block lists at most this many findings (all are counted in the metric).
MAX_FINDINGS = 100


async def guard_request(call: Call) -> None:
    """Runs the key's and the model's request guardrails on the request, read in the shape of
    its API (chat completions or messages): a block raises, a redaction replaces the call's
    body and parsed request together."""
    assert call.parsed is not None
    redacted = await check_request(call, call.api.shape, call.parsed.data)
    if redacted is not None:
        call.body = orjson.dumps(redacted)
        call.parsed = call.parsed.with_data(redacted)


async def check_request(call: Call, api: str, data: dict[str, Any]) -> dict[str, Any] | None:
    """The guardrails of `call`'s key and model on a parsed request body of `api` ("chat" or
    "messages"): raises GatewayError `guardrail_block`, or returns the body with the redacted
    texts replaced, or None when nothing must change (the client's bytes go on untouched)."""
    assert call.key is not None and call.model is not None
    plan = call.gateway.guardrails.plan(call.key, call.model)
    if plan is None or plan.request is None:
        return None
    scan = plan.request
    if len(call.body) > OFFLOAD_BYTES:
        found = await asyncio.to_thread(_find, scan, api, data)
    else:
        found = _find(scan, api, data)
    if found is None:
        return None
    segments, texts, hits = found
    record(call, hits)
    _raise_if_blocked(scan, hits, segments)
    edits = redactions(hits, segments, texts)
    return with_texts(data, edits) if edits else None


def _find(scan: Scan, api: str, data: dict[str, Any]) -> tuple[list[Segment], list[bytes], list[Hit]] | None:
    """The request's texts and what `scan` finds in them, or None when it finds nothing."""
    if scan.bits is not None and not maybe(data, REQUEST_ROOTS[api], scan.bits):
        return None  # nothing there any detector could find
    segments = request_segments(api, data)
    if not segments:
        return None
    texts = [segment.text.encode() for segment in segments]
    hits = scan.hits(texts)
    return (segments, texts, hits) if hits else None


def record(call: Call, hits: Sequence[Hit]) -> None:
    """Counts each finding and names the guardrails that acted."""
    metrics = call.gateway.metrics
    for hit in hits:
        guardrail = hit.guardrail
        if metrics is not None:
            metrics.guardrail_findings((guardrail.name, hit.match.category, guardrail.action)).inc()
        if guardrail.name not in call.guardrails:
            call.guardrails.append(guardrail.name)


def redactions(hits: Sequence[Hit], segments: Sequence[Segment], texts: Sequence[bytes]) -> list[tuple[Any, str]]:
    """(path, new text) for every segment a redacting guardrail matched in."""
    by_text: dict[int, list[Any]] = {}
    for hit in hits:
        if hit.guardrail.action == "redact":
            by_text.setdefault(hit.text, []).append(hit.match)
    return [
        (segments[index].path, redact_text(texts[index], matches, json_text=segments[index].json_text))
        for index, matches in sorted(by_text.items())
    ]


def _raise_if_blocked(scan: Scan, hits: Sequence[Hit], segments: Sequence[Segment]) -> None:
    """The first blocking guardrail (the key's before the model's) that found anything."""
    for guardrail in scan.guardrails:
        if guardrail.action != "block":
            continue
        mine = sorted((h for h in hits if h.guardrail is guardrail), key=lambda h: (h.text, h.match.start))
        if mine:
            findings = [
                {
                    "category": hit.match.category,
                    "message": guardrail.message(hit.match.category),
                    "location": segments[hit.text].location,
                }
                for hit in mine[:MAX_FINDINGS]
            ]
            raise errors.guardrail_block(guardrail.name, findings)
