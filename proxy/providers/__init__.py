"""The provider types, one module each behind `upstream.Provider`; `build` picks one by `type`.

The request path asks the built provider, never its type.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import ProviderConfig
from ..metrics import Metrics
from ..upstream import Provider
from .anthropic import AnthropicProvider
from .azure import AzureProvider
from .gemini import GeminiProvider
from .mock import MockTransport, render_anthropic, render_openai
from .openai import OpenAIProvider

Builder = Callable[[ProviderConfig, "Metrics | None"], Provider]


def _mock(config: ProviderConfig, metrics: Metrics | None) -> Provider:
    if config.imitate == "anthropic":
        return AnthropicProvider(config, metrics=metrics, transport=MockTransport(config, render_anthropic))
    return OpenAIProvider(config, transport=MockTransport(config, render_openai))


TYPES: dict[str, Builder] = {
    "openai": lambda config, metrics: OpenAIProvider(config),
    "anthropic": lambda config, metrics: AnthropicProvider(config, metrics=metrics),
    "azure": lambda config, metrics: AzureProvider(config),
    "gemini": lambda config, metrics: GeminiProvider(config),
    "mock": _mock,
}


def build(config: ProviderConfig, metrics: Metrics | None) -> Provider:
    return TYPES[config.type](config, metrics)
