"""`configreader`: integers the shared store cannot hold exactly are config errors."""

from __future__ import annotations

import pytest

from proxy.configfile import parse_config

from .test_configfile import patched, problems


@pytest.mark.parametrize(
    "path",
    ["keys[0].budget_tokens", "keys[0].limits.tpm", "models.gpt-4o.limits.rpm", "models.gpt-4o.default_max_tokens"],
)
def test_an_integer_past_2_53_is_refused_at_its_path(path: str) -> None:
    assert problems(patched({path: (1 << 64) + 1})) == [f"{path}: must be at most {1 << 53} (2^53)"]


def test_2_53_itself_is_accepted() -> None:
    assert parse_config(patched({"keys[0].budget_tokens": 1 << 53}), {}).keys[0].budget_tokens == 1 << 53
