"""Guardrails in the config file: what each entry may hold, the paths of its problems (a
pattern RE2 refuses among them, through `check-config`), and a SIGHUP that attaches one."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.cli import main
from proxy.config import ConfigError
from proxy.configfile import parse_config

from .processes import KEY

BASE = """
keys:
  - {{name: a, key: k1{key_extra}}}
providers:
  mock: {{type: mock}}
models:
  m: {{targets: [{{provider: mock}}]{model_extra}}}
guardrails:
{guardrails}
"""


def config_text(guardrails: str, key_extra: str = "", model_extra: str = "") -> str:
    return BASE.format(guardrails=guardrails, key_extra=key_extra, model_extra=model_extra)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        parse_config(text, {})
    return raised.value.problems


def test_a_full_guardrail_entry() -> None:
    config = parse_config(config_text(
        "  pii-checker: {type: pii, categories: [email, secret], action: redact, apply_to: [request, response]}\n"
        "  ids: {type: regex, patterns: {employee_id: 'EMP-\\d{6}'}, action: log}",
        key_extra=", guardrails: [pii-checker]", model_extra=", guardrails: [ids]",
    ), {})
    pii = config.guardrails["pii-checker"]
    assert (pii.type, pii.categories, pii.action, pii.apply_to) == (
        "pii", ("email", "secret"), "redact", frozenset({"request", "response"}))
    assert dict(config.guardrails["ids"].patterns) == {"employee_id": r"EMP-\d{6}"}
    assert config.guardrails["ids"].apply_to == frozenset({"request"})
    assert config.keys[0].guardrails == ("pii-checker",) and config.models["m"].guardrails == ("ids",)


@pytest.mark.parametrize(
    ("guardrails", "expected"),
    [
        ("  g: {type: regex, action: block, patterns: {ref: '(a)\\1'}}",
         "guardrails.g.patterns.ref: not a pattern RE2 can run in linear time: invalid escape sequence: \\1"),
        ("  g: {type: regex, action: block, patterns: {ref: '(?=x)y'}}",
         "guardrails.g.patterns.ref: not a pattern RE2 can run in linear time: invalid perl operator: (?="),
        ("  g: {type: regex, action: block, patterns: {ref: 'x*'}}", "guardrails.g.patterns.ref: must not match the empty string"),
        ("  g: {type: regex, action: block}", "guardrails.g.patterns: at least one pattern is required for type regex"),
        ("  g: {type: pii, action: block, apply_to: [response]}",
         "guardrails.g.action: block cannot apply to responses (already on their way): use redact or log"),
        ("  g: {type: pii, action: block, categories: [emails]}",
         "guardrails.g.categories[0]: must be one of email, phone, credit_card, iban, ssn, ip_address, secret"),
        ("  g: {type: pii, action: mask}", "guardrails.g.action: must be one of block, redact, log"),
        ("  g: {type: pii}", "guardrails.g.action: is required"),
        ("  g: {type: pii, action: log, pattern: x}", "guardrails.g.pattern: unknown key"),
        ("  g: {type: pii, action: log, patterns: {a: b}}", "guardrails.g.patterns: only for type regex"),
    ],
)
def test_problems_have_their_paths(guardrails: str, expected: str) -> None:
    assert expected in problems(config_text(guardrails))


def test_references_must_name_a_guardrail() -> None:
    found = problems(config_text("  g: {type: pii, action: log}", key_extra=", guardrails: [gg]",
                                 model_extra=", guardrails: [g, nope]"))
    assert found == ["keys[0].guardrails[0]: unknown guardrail 'gg'", "models.m.guardrails[1]: unknown guardrail 'nope'"]


def test_check_config_reports_a_refused_pattern(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text("  g: {type: regex, action: redact, patterns: {ref: '(\\w+)\\s\\1'}}"))
    assert main(["check-config", str(path)]) == 2
    report = capsys.readouterr().err
    assert "1 problem(s)" in report
    assert "guardrails.g.patterns.ref: not a pattern RE2 can run in linear time" in report


async def test_sighup_attaches_a_guardrail(serve: Any) -> None:
    process = await serve()
    body = {"model": "demo-chat", "messages": [{"role": "user", "content": "mail john.doe@example.com"}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{process.url}/v1/chat/completions", json=body, headers=headers) as response:
            assert response.status == 200
        text = process.config.read_text().replace("    key: ", "    guardrails: [pii]\n    key: ", 1)
        process.config.write_text(text + "guardrails:\n  pii: {type: pii, action: block}\n")
        process.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while True:
                async with http.post(f"{process.url}/v1/chat/completions", json=body, headers=headers) as response:
                    if response.status == 400:
                        assert (await response.json())["error"]["guardrail_key"] == "pii"
                        break
                await asyncio.sleep(0.05)
    assert await process.stop() == 0
