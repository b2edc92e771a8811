"""The guardrails' prefilter never says no where the detectors' pattern has a candidate.

Checked against the RE2 pattern itself (every candidate, near-misses included, not only the
findings) on the detector tables placed at every offset of a 64-byte block, and on generated
texts; the vectorised reading (64 bytes at a time) and the byte-by-byte one must agree. Also:
what it skips (prose without candidates) and what a body it cannot judge gets (a maybe).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.guardrails import _prefilter, prefilter
from proxy.guardrails.detectors import CATEGORIES, Detector
from proxy.guardrails.prefilter import mask, maybe

from .test_guardrails_detectors import FINDS, NEAR_MISSES

ALL_BITS = mask(CATEGORIES)
DETECTORS = {category: Detector(frozenset({category})) for category in CATEGORIES}
ALL = Detector(frozenset(CATEGORIES))
PROSE = "The quarterly report lists revenue by region and the cost of each product line; "


def candidate(detector: Detector, text: str) -> bool:
    return detector._pattern.search(text.encode()) is not None


def says(text: str, bits: int = ALL_BITS) -> bool:
    return maybe({"messages": [{"role": "user", "content": text}]}, ("messages",), bits)


@pytest.fixture(params=[True, False], ids=["vectors", "bytes"])
def reading(request: pytest.FixtureRequest) -> Iterator[bool]:
    before = _prefilter.vectors(request.param)
    yield request.param
    _prefilter.vectors(before)


def test_the_compiled_module_is_built() -> None:
    # Without it every body goes to the full detector: the same findings, much more CPU.
    assert prefilter.NATIVE


def test_vectors_are_used_where_the_cpu_has_them() -> None:
    before = _prefilter.vectors(True)
    try:
        import platform

        if platform.machine() in ("x86_64", "AMD64"):
            with open("/proc/cpuinfo") as info:
                has_avx2 = " avx2" in info.read()
            assert _prefilter.vectors(True) is has_avx2
    finally:
        _prefilter.vectors(before)


# A key block right after a run of digits and separators (the run must not hide its dashes).
RUNS = ["00000-----BEGIN RSA PRIVATE KEY-----\nMIIB", "1 2 -----BEGIN PRIVATE KEY-----", "4.4.4 -----BEGIN EC PRIVATE KEY-----"]
SAMPLES = [text for text, _, _ in FINDS] + NEAR_MISSES + RUNS


@pytest.mark.parametrize("text", SAMPLES)
def test_every_table_text_at_every_offset_of_a_block(reading: bool, text: str) -> None:
    for offset in range(0, 70):
        padded = (PROSE * 3)[:offset] + text + " " + PROSE * 2
        for category, detector in DETECTORS.items():
            if candidate(detector, padded):
                assert says(padded, mask([category])), (category, offset)
        if candidate(ALL, padded):
            assert says(padded), offset


def test_prose_without_candidates_is_skipped(reading: bool) -> None:
    prose = (
        "The report of 2024-03-31 lists revenue (EMEA up 12.5%, APAC 8.1%), release 3.2.1 and order "
        "48213; see the well-known table: Berater, nearer, clearer. "
    ) * 40
    assert not candidate(ALL, prose)
    assert not says(prose)
    assert not says("", ALL_BITS)


def test_what_each_category_stops_at() -> None:
    # A category not asked for is not looked for.
    assert says("mail a.b@example.com", mask(["email"]))
    assert not says("mail a.b@example.com", mask(["phone", "secret"]))
    assert not says("call +1 415 555 2671", mask(["email"]))
    assert says("call +1 415 555 2671", mask(["phone"]))


def test_values_it_walks() -> None:
    bits = ALL_BITS
    # Every str under the roots, at any depth, dict values only; a root absent is nothing.
    assert maybe({"messages": [{"content": [{"type": "text", "text": "x a@b.co"}]}]}, ("messages",), bits)
    assert maybe({"system": [{"text": "4111 1111 1111 1111"}], "messages": []}, ("system", "messages"), bits)
    assert not maybe({"messages": [{"a@b.co": "plain"}]}, ("messages",), bits)  # a key is no text
    assert not maybe({"model": "a@b.co", "messages": []}, ("messages",), bits)  # outside the roots
    assert not maybe({}, ("system", "messages"), bits)
    assert not maybe({"messages": [1, 2.5, None, True, {"n": 123456789012}]}, ("messages",), bits)
    # Too deep to walk, or no UTF-8 form (a lone surrogate): the full detector judges.
    deep: object = "plain"
    for _ in range(100):
        deep = [deep]
    assert maybe({"messages": deep}, ("messages",), bits)
    assert maybe({"messages": ["\ud800 plain"]}, ("messages",), bits)
    with pytest.raises(TypeError):
        maybe([], ("messages",), bits)


# Texts made of the pieces shapes are made of, so that candidates and near-candidates are
# common: digits, separators, hex, the key prefixes, `@`, `:`, letters, non-ASCII.
PIECES = st.sampled_from([
    "0", "1", "4", "9", "12", "123", "4111", " ", "-", ".", "(", ")", "+", ":", "::", "@", "_", "a", "e",
    "r", "A", "B", "b", "K", "I", "z", "J", "y", "x", "o", "k", "s", "sk-", "gh", "p", "github_pat_",
    "xoxb-", "AKIA", "AIza", "eyJ", "Bearer ", "earer", "-----BEGIN", " PRIVATE KEY-----", "DE", "89",
    "fe80", "é", "日本", "\t", "\n", "%", ",", "/", "abcdefghij", "ABCDEFGHIJ", "0123456789",
])
TEXTS = st.lists(PIECES, max_size=80).map("".join)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.integers(min_value=0, max_value=140), text=TEXTS, category=st.sampled_from([*CATEGORIES, "*"]))
def test_generated_texts(prefix: int, text: str, category: str) -> None:
    padded = (PROSE * 3)[:prefix] + text
    detector, bits = (ALL, ALL_BITS) if category == "*" else (DETECTORS[category], mask([category]))
    verdicts = []
    for vectors in (True, False):
        before = _prefilter.vectors(vectors)
        try:
            verdicts.append(says(padded, bits))
        finally:
            _prefilter.vectors(before)
    if candidate(detector, padded):
        assert verdicts == [True, True]
    assert verdicts[0] == verdicts[1]


@pytest.mark.parametrize("unit", ["A", "AKI", "-", ":", "r", "rer", "@", "_", "1a", "1 ", "1.", "eyJ", "ab12"])
def test_texts_of_one_repeated_stop_byte(reading: bool, unit: str) -> None:
    # The worst inputs for a loop that stops at such bytes: each is judged, and the verdict
    # (over 64 KiB, read without the GIL) is the pattern's.
    text = unit * (100_000 // len(unit))
    if candidate(ALL, text):
        assert says(text)
    assert says(text) is _bytes_verdict(text)


def _bytes_verdict(text: str) -> bool:
    before = _prefilter.vectors(False)
    try:
        return says(text)
    finally:
        _prefilter.vectors(before)


async def test_large_texts_are_read_in_worker_threads_at_once() -> None:
    # Texts over 64 KiB are read without the GIL (the stage sends large bodies to a thread).
    import asyncio

    clean = (PROSE * 20_000)[:1_500_000]
    found = clean[:700_000] + " a@b.co " + clean[700_000:]
    verdicts = await asyncio.gather(*(asyncio.to_thread(says, text) for text in (clean, found, clean, found)))
    assert verdicts == [False, True, False, True]
