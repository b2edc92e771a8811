"""Guardrails as configured, compiled once per config: which apply to a key and model, in which
direction, and the one scan they share over a request's (or an answer's) texts.

A key's and its model's guardrails all run; their built-in categories are found in one detector
pass over all texts joined, operators' patterns (RE2, linear time) text by text. Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

from ..config import GuardrailConfig, KeyConfig, ModelConfig
from . import prefilter
from .detectors import CATEGORIES, Detector, Match

SEPARATOR = b"\x00"  # between joined texts: no built-in shape matches it, so none spans two texts
MESSAGES = {"pii": "PII detected", "secret": "Secret detected", "regex": "Pattern matched"}


def compile_pattern(pattern: str) -> Any:
    """An operator's pattern compiled by RE2 (raises `re2.error` for what RE2 refuses: back
    references, lookaround, and anything else that cannot run in linear time)."""
    options = re2.Options()
    options.log_errors = False
    return re2.compile(pattern.encode(), options)


class Guardrail:
    """One configured guardrail: what it looks for and what it does with what it finds."""

    __slots__ = ("name", "action", "on_request", "on_response", "categories", "patterns")

    def __init__(self, config: GuardrailConfig) -> None:
        self.name = config.name
        self.action = config.action
        self.on_request = "request" in config.apply_to
        self.on_response = "response" in config.apply_to
        self.categories = frozenset(config.categories or CATEGORIES) if config.type == "pii" else frozenset()
        self.patterns = tuple((category, compile_pattern(p)) for category, p in config.patterns.items())

    def message(self, category: str) -> str:
        if self.patterns:
            return MESSAGES["regex"]
        return MESSAGES["secret"] if category == "secret" else MESSAGES["pii"]


@dataclass(frozen=True, slots=True)
class Hit:
    """A match in text number `text`, found by `guardrail`."""

    guardrail: Guardrail
    text: int
    match: Match


class Scan:
    """The guardrails acting in one direction, and the detector pass they share."""

    __slots__ = ("guardrails", "detector", "bits")

    def __init__(self, guardrails: Sequence[Guardrail]) -> None:
        self.guardrails = tuple(guardrails)
        categories = frozenset().union(*(g.categories for g in guardrails))
        self.detector = Detector(categories) if categories else None
        # the prefilter's categories (`prefilter.maybe`), or None when an operator's pattern
        # must read every text
        self.bits = None if any(g.patterns for g in guardrails) else prefilter.mask(categories)

    def hits(self, texts: Sequence[bytes]) -> list[Hit]:
        """Every match of every guardrail in `texts` (UTF-8), offsets within each text."""
        found: list[Hit] = []
        if self.detector is not None and texts:
            found = self._builtin(texts)
        for guardrail in self.guardrails:
            for category, pattern in guardrail.patterns:
                for index, text in enumerate(texts):
                    for m in pattern.finditer(text):
                        if m.end() > m.start():
                            found.append(Hit(guardrail, index, Match(category, m.start(), m.end())))
        return found

    def _builtin(self, texts: Sequence[bytes]) -> list[Hit]:
        assert self.detector is not None
        joined = texts[0] if len(texts) == 1 else SEPARATOR.join(texts)
        starts = [0]
        for text in texts[:-1]:
            starts.append(starts[-1] + len(text) + 1)
        found: list[Hit] = []
        for match in self.detector.find(joined):
            index = bisect_right(starts, match.start) - 1
            base = starts[index]
            local = Match(match.category, match.start - base, match.end - base)
            for guardrail in self.guardrails:
                if match.category in guardrail.categories:
                    found.append(Hit(guardrail, index, local))
        return found


class Plan:
    """What runs for one key and model: the request's scan and the answer's (None: nothing)."""

    __slots__ = ("request", "response")

    def __init__(self, guardrails: Sequence[Guardrail]) -> None:
        on_request = [g for g in guardrails if g.on_request]
        on_response = [g for g in guardrails if g.on_response]
        self.request = Scan(on_request) if on_request else None
        self.response = Scan(on_response) if on_response else None


class Guardrails:
    """Every configured guardrail, compiled once, and the plan of each key and model pair,
    built the first time the pair is seen (a pair without guardrails costs one lookup)."""

    __slots__ = ("_by_name", "_plans")

    def __init__(self, configs: Mapping[str, GuardrailConfig]) -> None:
        self._by_name = {name: Guardrail(config) for name, config in configs.items()}
        self._plans: dict[tuple[str, str], Plan | None] = {}

    def plan(self, key: KeyConfig, model: ModelConfig) -> Plan | None:
        if not key.guardrails and not model.guardrails:
            return None
        pair = (key.name, model.name)
        if pair not in self._plans:
            names = dict.fromkeys((*key.guardrails, *model.guardrails))  # the key's first, once each
            self._plans[pair] = Plan([self._by_name[name] for name in names])
        return self._plans[pair]
