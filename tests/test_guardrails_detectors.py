"""The built-in detectors, table-driven: what each must find (in text of several languages) and
the near-misses it must not (cards failing Luhn, order ids, dates, timestamps, UUIDs, semver,
IPs in version strings)."""

from __future__ import annotations

import pytest

from proxy.guardrails.detectors import CATEGORIES, Detector

ALL = Detector(frozenset(CATEGORIES))


def found(text: str) -> list[tuple[str, str]]:
    data = text.encode()
    return [(m.category, data[m.start : m.end].decode()) for m in ALL.find(data)]


FINDS = [
    # email
    ("Write to john.doe@example.com today", "email", "john.doe@example.com"),
    ("Schreiben Sie an müller.jürgen@beispiel.de bitte", "email", "müller.jürgen@beispiel.de"),
    ("Contactez-moi : marie+news@exemple.fr.", "email", "marie+news@exemple.fr"),
    ("メールは taro_yamada@example.co.jp です", "email", "taro_yamada@example.co.jp"),
    # phone
    ("Call me at +1 415 555 2671 tonight", "phone", "+1 415 555 2671"),
    ("Appelez le 06 12 34 56 78 demain", "phone", "06 12 34 56 78"),
    ("Ruf mich an: 030 12345678", "phone", "030 12345678"),
    ("Llámame al +34 612 34 56 78", "phone", "+34 612 34 56 78"),
    ("Office (415) 555-2671 ext", "phone", "(415) 555-2671"),
    ("電話番号は 090-1234-5678 です", "phone", "090-1234-5678"),
    ("UK office 020 7946 0958", "phone", "020 7946 0958"),
    ("international 0033 6 12 34 56 78", "phone", "0033 6 12 34 56 78"),
    ("Niue +683 4002 ok", "phone", "+683 4002"),  # seven digits: only after a `+`
    # credit_card
    ("My card is 4111 1111 1111 1111, exp 12/27", "credit_card", "4111 1111 1111 1111"),
    ("Karte 5500-0000-0000-0004 bitte belasten", "credit_card", "5500-0000-0000-0004"),
    ("amex 3782 822463 10005", "credit_card", "3782 822463 10005"),
    ("tarjeta 4012888888881881", "credit_card", "4012888888881881"),
    # iban
    ("IBAN: DE89 3704 0044 0532 0130 00 (Berlin)", "iban", "DE89 3704 0044 0532 0130 00"),
    ("virement sur FR1420041010050500013M02606", "iban", "FR1420041010050500013M02606"),
    ("bonifico su IT60 X054 2811 1010 0000 0123 456", "iban", "IT60 X054 2811 1010 0000 0123 456"),
    ("gb29 nwbk 6016 1331 9268 19 lowercase", "iban", "gb29 nwbk 6016 1331 9268 19"),
    # ssn
    ("SSN 123-45-6789 on file", "ssn", "123-45-6789"),
    ("social 536 22 1234 ok", "ssn", "536 22 1234"),
    # ip_address
    ("server at 203.0.113.42 is down", "ip_address", "203.0.113.42"),
    ("connect to 10.1.2.3:8080/health", "ip_address", "10.1.2.3"),
    ("IPv6 2001:db8:85a3::8a2e:370:7334 here", "ip_address", "2001:db8:85a3::8a2e:370:7334"),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "ip_address", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("Die Adresse 192.168.178.1 ist privat", "ip_address", "192.168.178.1"),
    # seven digits without `+` are no number candidate, so none hides the address after them
    ("rack 12 10.1.2.3 is down", "ip_address", "10.1.2.3"),
    # secret
    ("key sk-proj-4fQxW9ZbT2LmN8pR3sV6yK1aD7hJ0cE5 leaked", "secret", "sk-proj-4fQxW9ZbT2LmN8pR3sV6yK1aD7hJ0cE5"),
    ("anthropic sk-ant-api03-Zx81kPq0LmW2nR7tY5uV9bC3dF6gH4j", "secret", "sk-ant-api03-Zx81kPq0LmW2nR7tY5uV9bC3dF6gH4j"),
    ("aws AKIAIOSFODNN7EXAMPLE in env", "secret", "AKIAIOSFODNN7EXAMPLE"),
    ("Authorization: Bearer 8f3kZ0qLw9Xb2Tn5Rv7Y", "secret", "8f3kZ0qLw9Xb2Tn5Rv7Y"),
    (
        "jwt eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "secret",
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    (
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1b+/=\nq9Zx\n-----END RSA PRIVATE KEY-----\nthanks",
        "secret",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1b+/=\nq9Zx\n-----END RSA PRIVATE KEY-----",
    ),
    ("token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 ok", "secret", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
]


@pytest.mark.parametrize(("text", "category", "match"), FINDS)
def test_finds(text: str, category: str, match: str) -> None:
    assert found(text) == [(category, match)]


NEAR_MISSES = [
    "card 4111 1111 1111 1112 fails Luhn",
    "Bestellnummer 1234567890123456 vom Montag",  # a 16-digit order id (fails Luhn)
    "order 8812 3345 6678 9901 shipped",  # grouped like a card, fails Luhn
    "pedido 0000000000000000",
    "Termin am 2024-01-15 um 10:30:00 Uhr",
    "dated 2024-03-31 and 31.03.2024, id 12345678 and +1234567",
    "le 15/01/2024 à 10h30",
    "timestamp 1700000000 and 1700000000123 ms",
    "created 2024-03-05T14:07:09.123Z",
    "uuid 550e8400-e29b-41d4-a716-446655440000",
    "uuid 12345678-1234-1234-1234-123456789012",
    "release v1.2.3 and 2.10.0-rc.1 of the library",
    "version 10.0.19041.1 of Windows",
    "Chrome 120.0.6099.109 and firmware 1.2.3.4",
    "versión 4.3.2.1 instalada",
    "upgrade to v1.2.3.4 now",
    "localhost 127.0.0.1 and 0.0.0.0 and netmask 255.255.255.0",
    "invalid ip 999.12.1.1",
    "the time is 12:30:45 and MAC 00:1A:2B:3C:4D:5E",
    "SSN-shaped 000-12-3456 and 666-12-3456 and 900-12-3456 and 123-00-4567",
    "pi is 3.14159265358979 and e 2.718281828",
    "icon@2x.png and logo@3x.jpg",
    "sk-learn-is-a-python-library-for-ml",
    "Bearer authentication-is-explained-here",
    "IBAN-like DE89 3704 0044 0532 0130 01 fails mod-97",
    "price $1,234,567.89 and 1.000.000 €",
    "ISBN 978-3-16-148410-0",
    "Zahlen 1 2 3 4 5 6 7 8 9 10 11 12",
    "eyJub3QiOiJhIGp3dCJ9.aaaaaaaaaa.bbbbbbbbbb",
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_do_not_count(text: str) -> None:
    assert found(text) == []


def test_only_the_requested_categories_are_found() -> None:
    text = b"mail a.b@example.com card 4111 1111 1111 1111"
    emails = Detector(frozenset({"email"}))
    assert [m.category for m in emails.find(text)] == ["email"]
    cards = Detector(frozenset({"credit_card"}))
    assert [m.category for m in cards.find(text)] == ["credit_card"]


def test_texts_joined_with_nul_are_never_matched_across() -> None:
    assert ALL.find(b"4111 1111\x001111 1111") == []
    assert ALL.find(b"john\x00@example.com") == []


def test_several_findings_in_order() -> None:
    assert [c for c, _ in found("a@example.com, 4111111111111111 and 203.0.113.9")] == [
        "email", "credit_card", "ip_address",
    ]
