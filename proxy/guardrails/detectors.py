"""The built-in PII and secret detectors: one RE2 pattern finds candidates, validators keep the real ones.

Candidates of every requested category are found in one linear-time pass (google-re2, a DFA: no
input can make it backtrack); each candidate is then validated, so that what merely looks like
PII does not count: card numbers must pass Luhn and carry a card issuer's prefix
(`stdnum.luhn`), IBANs mod-97 and their country's length (`stdnum.iban`), SSNs the area, group
and serial rules (`stdnum.us.ssn`), phone numbers libphonenumber's numbering plans
(`phonenumbers`), IP addresses `ipaddress` (never inside a version string), tokens their shape.
Kept libraries over hand-written checks: their tables (IBAN lengths, numbering plans, SSN
exclusions) are maintained upstream. Pure: no I/O, nothing of the app.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import orjson
import phonenumbers
import re2
from phonenumbers import PhoneMetadata, PhoneNumber
from stdnum import iban, luhn
from stdnum.us import ssn

CATEGORIES = ("email", "phone", "credit_card", "iban", "ssn", "ip_address", "secret")


@dataclass(frozen=True, slots=True)
class Match:
    """A span of text `[start, end)` found to be `category`."""

    category: str
    start: int
    end: int


# Candidate shapes, in priority order (at one position the first shape that matches wins), each
# with the categories it can turn out to be. No class here matches "\x00": texts joined with it
# are never matched across.
_HEX = "[0-9A-Fa-f]{1,4}"
_DIGIT = r"(?:\d(?:[ .\-]|\) ?| ?\()?)"  # a digit and the separator after it, if any
_SHAPES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("pem", ("secret",),
     r"-----BEGIN[A-Z ]{0,30}PRIVATE KEY-----(?:\s*[A-Za-z][A-Za-z-]*: [^\n\x00]*)*[A-Za-z0-9+/=\s]*"
     r"(?:-----END[A-Z ]{0,30}PRIVATE KEY-----)?"),
    ("token", ("secret",),
     r"\b(?:sk-[A-Za-z0-9_\-]{20,}|(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36}\b|github_pat_[A-Za-z0-9_]{40,}"
     r"|xox[abprs]-[A-Za-z0-9\-]{10,}|AIza[A-Za-z0-9_\-]{35}\b"
     r"|(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)[A-Z0-9]{16}\b)"),
    ("bearer", ("secret",), r"\b[Bb]earer[ \t]+[A-Za-z0-9\-._~+/]{16,}=*"),
    ("jwt", ("secret",), r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
    ("email", ("email",),
     r"[\p{L}\p{N}._%+\-]+@[\p{L}\p{N}\-]+(?:\.[\p{L}\p{N}\-]+)*\.\p{L}{2,}"),
    ("iban", ("iban",), r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,3})?\b"),
    ("ipv4", ("ip_address",), r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
    # two colons at least (a time of day has one), or a compressed `fe80::1`
    ("ipv6", ("ip_address",), rf"(?:\b{_HEX}|::)(?:::?{_HEX}){{2,7}}(?:::)?|\b{_HEX}::{_HEX}\b"),
    # Digits with one separator between two. Nine at least, as few as any validator accepts
    # (national phone numbers and SSNs 9, cards 13), seven after a `+` (the shortest
    # international number): an 8-digit date or id is no candidate, and costs nothing.
    ("number", ("credit_card", "ssn", "phone"),
     rf"\+{_DIGIT}{{6,40}}\d\b|(?:\(|\b){_DIGIT}{{8,40}}\d\b"),
)

# Words that put a dotted quad in a version string, in a few languages.
_VERSION_WORD = re.compile(
    r"(?:\bv|version|versión|versão|versione|versie|wersja|ver\.?|release|build|firmware|バージョン|版本)"
    r"[\s:=]*$",
    re.IGNORECASE,
)
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4}")
_SSN_SHAPE = re.compile(r"\d{3}([- ])\d{2}\1\d{4}")
_CARD_GROUPS = re.compile(r"\d{4}(?:([ \-])\d{4}){2,3}(?:\1\d{1,3})?|\d{4}([ \-])\d{6}\2\d{4,5}")
# Issuer prefixes (IIN ranges) of the card networks in use: Visa, Mastercard, Amex, Discover,
# Diners, JCB, UnionPay, Maestro, Mir.
_CARD_PREFIX = re.compile(
    r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6(?:011|5|4[4-9])|3(?:0[0-5]|[689])"
    r"|35(?:2[89]|[3-8]\d)|62|5[06-9]|6\d|220[0-4]"
)
_IMAGE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "bmp", "tif", "tiff"})
# Regions whose national formats (no +country code) count as phone numbers; international
# formats count for every region libphonenumber knows.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "JP", "AU", "IN", "BR")


_TOKEN_PREFIXES = (
    b"sk-", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_", b"xoxa-", b"xoxb-", b"xoxp-",
    b"xoxr-", b"xoxs-", b"AIza", b"AKIA", b"ASIA", b"ABIA", b"ACCA", b"AGPA", b"AIDA", b"AROA", b"ANPA",
    b"ANVA", b"APKA",
)
_IBAN_START = re.compile(rb"[A-Za-z]{2}\d{2}")
_IPV4_SHAPE = re.compile(rb"(?:\d{1,3}\.){3}\d{1,3}")
_NUMBER_STARTS = frozenset(b"0123456789+(")


class Detector:
    """The built-in detectors of `categories`, compiled once into one RE2 pattern over UTF-8.

    Works on bytes: RE2 matches UTF-8 itself, and the offsets need no conversion (over str the
    binding maps every match back to characters, four times the cost of a match).
    """

    __slots__ = ("categories", "_pattern")

    def __init__(self, categories: frozenset[str]) -> None:
        self.categories = categories
        shapes = [pattern for _, kinds, pattern in _SHAPES if categories.intersection(kinds)]
        options = re2.Options()
        options.log_errors = False
        options.never_capture = True  # spans only: a capture costs three times a match
        self._pattern = re2.compile("|".join(f"(?:{shape})" for shape in shapes).encode(), options)

    def candidates(self, text: bytes) -> Iterator[tuple[int, int, str | None]]:
        """Every candidate span, with the category it validated as (None: a near-miss)."""
        for found in self._pattern.finditer(text):
            start, end = found.span()
            kind = _kind(text[start:end])
            category = _validate(kind, text, start, end)
            if category is not None and category not in self.categories:
                category = None
            if category == "secret" and kind == "bearer":
                start = _token_start(text, start)
            yield start, end, category

    def find(self, text: bytes) -> list[Match]:
        return [Match(category, start, end) for start, end, category in self.candidates(text) if category]


def _kind(candidate: bytes) -> str:
    """Which shape matched `candidate`: the first in `_SHAPES` that can, told apart by what
    each must start with or contain (cheaper than asking RE2 for capture groups)."""
    if b"@" in candidate:
        return "email"  # no other shape holds an @
    if candidate[0] in _NUMBER_STARTS:
        if b":" in candidate:
            return "ipv6"
        return "ipv4" if _IPV4_SHAPE.fullmatch(candidate) else "number"
    if candidate.startswith(b"-----BEGIN"):
        return "pem"
    if candidate[1:6] == b"earer" and candidate[:1] in b"Bb" and candidate[6:7] in (b" ", b"\t"):
        return "bearer"
    if candidate.startswith(_TOKEN_PREFIXES):
        return "token"
    if candidate.startswith(b"eyJ"):
        return "jwt"
    if _IBAN_START.match(candidate):
        return "iban"
    return "ipv6"  # starting with a hex letter or ::


def _validate(kind: str, text: bytes, start: int, end: int) -> str | None:
    candidate = text[start:end].decode(errors="replace")
    if kind == "number":
        return _number(candidate, text, start, end)
    if kind == "email":
        return "email" if _is_email(candidate) else None
    if kind == "iban":
        return "iban" if iban.is_valid(candidate) else None
    if kind == "ipv4" or kind == "ipv6":
        return "ip_address" if _is_ip(candidate, text, start, end) else None
    if kind == "token" or kind == "bearer":
        return "secret" if _is_token(candidate) else None
    if kind == "jwt":
        return "secret" if _is_jwt(candidate) else None
    return "secret"  # a private-key block: its armour is proof enough


def _number(candidate: str, text: bytes, start: int, end: int) -> str | None:
    """A card, an SSN or a phone number; dates, times, decimals and longer runs are none."""
    if _DATE.match(candidate.lstrip("+(")) or text.startswith((b":", b".", b","), end) and text[end + 1 : end + 2].isdigit():
        return None
    if start and text[start - 1 : start] in (b".", b",", b":", b"/", b"#", b"-") and not candidate.startswith(("+", "(")):
        return None  # the tail of a decimal, a time, a path or an id
    digits = "".join(char for char in candidate if char.isdigit())
    if 13 <= len(digits) <= 19 and _is_card(candidate, digits):
        return "credit_card"
    if _SSN_SHAPE.fullmatch(candidate):
        return "ssn" if ssn.is_valid(digits) else None
    if 7 <= len(digits) <= 15 and _is_phone(candidate, digits):
        return "phone"
    return None


def _is_card(candidate: str, digits: str) -> bool:
    if candidate != digits and not _CARD_GROUPS.fullmatch(candidate):
        return False
    return bool(_CARD_PREFIX.match(digits)) and len(set(digits)) > 1 and luhn.is_valid(digits)


def _is_phone(candidate: str, digits: str) -> bool:
    if candidate.startswith("+"):
        return _international(digits)
    if candidate.startswith("00") and len(digits) > 9:
        return _international(digits[2:])
    # A national number needs the grouping people write numbers with: a bare run of digits is
    # an order number, an id or a timestamp far more often than a phone number.
    if candidate == digits or len(digits) < 9:
        return False
    if candidate.count(".") == 1 and len(candidate) == len(digits) + 1:
        return False  # a decimal number
    return _national(digits)


@lru_cache(maxsize=4096)
def _international(digits: str) -> bool:
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            national = digits[size:]
            if not national or national.startswith("0") and code != 39:
                return False
            return phonenumbers.is_valid_number(PhoneNumber(country_code=code, national_number=int(national)))
    return False


@lru_cache(maxsize=4096)
def _national(digits: str) -> bool:
    for region in PHONE_REGIONS:
        metadata = PhoneMetadata.metadata_for_region(region)
        if metadata is None:
            continue
        prefix = metadata.national_prefix or ""
        national = digits[len(prefix):] if prefix and digits.startswith(prefix) else digits
        if not national or national.startswith("0") and region != "IT":
            continue
        number = PhoneNumber(
            country_code=metadata.country_code, national_number=int(national),
            italian_leading_zero=national.startswith("0") or None,
        )
        if phonenumbers.is_valid_number_for_region(number, region):
            return True
    return False


def _is_email(candidate: str) -> bool:
    local, _, domain = candidate.rpartition("@")
    if not local or len(local) > 64 or local[0] == "." or local[-1] == "." or ".." in local:
        return False
    labels = domain.split(".")
    if any(not label or label[0] == "-" or label[-1] == "-" for label in labels):
        return False
    return labels[-1].lower() not in _IMAGE_SUFFIXES  # `icon@2x.png` is a file name


def _is_ip(candidate: str, text: bytes, start: int, end: int) -> bool:
    before = text[max(0, start - 24) : start].decode(errors="ignore")
    if before[-1:].isalnum() or before[-1:] in ("_", "-", ".") or _VERSION_WORD.search(before):
        return False
    after = text[end : end + 2]
    if len(after) == 2 and after[:1] in (b".", b"-", b"+") and after[1:].isalnum():
        return False  # 1.2.3.4.5, 1.2.3.4-beta: a version
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if address.version == 6 and candidate.count(":") < 7 and "::" not in candidate:
        return False
    # Loopback, unspecified, multicast and reserved addresses (netmasks among them) name no one.
    return not (address.is_loopback or address.is_unspecified or address.is_multicast or address.is_reserved)


def _is_token(candidate: str) -> bool:
    """A key-shaped string with the mix of letters and digits a generated key has (so that
    `sk-learn-is-a-library` is none)."""
    tail = candidate.split(None, 1)[-1]
    return any(char.isdigit() for char in tail) and any(char.isalpha() for char in tail) and len(set(tail)) >= 10


def _is_jwt(candidate: str) -> bool:
    header = candidate.split(".", 1)[0]
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, ValueError):
        return False
    return type(decoded) is dict and ("alg" in decoded or "typ" in decoded)


def _token_start(text: bytes, start: int) -> int:
    """Where the token of `Bearer <token>` starts: the scheme word itself is kept."""
    space = start + 6
    while text[space : space + 1] in (b" ", b"\t"):
        space += 1
    return space
