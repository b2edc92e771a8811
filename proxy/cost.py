"""What a request costs (SPEC §12): its settled usage at its model's prices, in exact integers.

Prices are pico-dollars per token (`config.Price`); a request's cost is computed exactly in
pico-dollars, then rounded up to whole nano-dollars, the unit every counter holds (so a counter
never shows less than was spent, and is off by under a nano-dollar per request). Pure arithmetic.
"""

from __future__ import annotations

from .config import Price

NANO_PER_USD = 10**9
PICO_PER_NANO = 1000
# No request costs anywhere near this (about a million dollars): the clamp keeps any figure,
# however absurd, exact in the shared store's Lua numbers (doubles, exact to 2^53).
MAX_COST_NANO = 1 << 50


def cost_nano(price: Price, *, prompt: int, cached: int, cache_write: int, completion: int) -> int:
    """Nano-dollars for a request: uncached prompt tokens at `input`, cache reads at
    `cached_input`, cache writes at `cache_write`, completion at `output`.

    `prompt` counts every input token (cache reads and writes included, as OpenAI and the
    converted Anthropic usage report it); cache figures beyond it are untrusted and capped.
    """
    cached = min(max(0, cached), prompt)
    cache_write = min(max(0, cache_write), prompt - cached)
    uncached = prompt - cached - cache_write
    pico = (
        uncached * price.input
        + cached * price.cached_input
        + cache_write * price.cache_write
        + completion * price.output
    )
    return min(-(-pico // PICO_PER_NANO), MAX_COST_NANO)


def usd(nano: int | None) -> float | None:
    """Nano-dollars as USD, for logs and answers (exact to the nano-dollar as decimal text)."""
    return None if nano is None else nano / NANO_PER_USD
