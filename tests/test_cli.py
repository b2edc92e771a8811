"""The `llm-proxy` command line: hash-key and check-config."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from proxy.cli import main

BROKEN = """
server:
  port: 99999
  prot: 1
keys:
  - name: a
    key: k1
    key_sha256: abc
providers:
  openai:
    type: openai
    base_url: ftp://nowhere
    accounts:
      - {name: one, api_key: x, weight: 0}
models:
  m:
    targets: [{provider: nope}]
    fallbacks: [missing]
"""


def test_hash_key_prints_sha256(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hash-key", "sk-abc"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"sk-abc").hexdigest()


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    for where in (
        "server.port",
        "server.prot",
        "keys[0]",
        "providers.openai.base_url",
        "providers.openai.accounts[0].weight",
        "models.m.targets[0].provider",
        "models.m.fallbacks[0]",
    ):
        assert where in err, where


def test_check_config_accepts_the_shipped_configs(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    for name in ("demo.yaml", "example.yaml"):
        assert main(["check-config", str(root / "deploy" / name)]) == 0
    assert capsys.readouterr().out.count(": ok") == 2


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    assert main(["check-config", str(tmp_path / "absent.yaml")]) == 2
