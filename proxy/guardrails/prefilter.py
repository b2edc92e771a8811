"""Whether a parsed body could hold a built-in detector's candidate, at about the cost of parsing it.

`maybe(body, roots, bits)`: False only when no str under the `roots` of a parsed body holds
a candidate of the categories in `bits`. The detectors' RE2 pass reads every byte at ~2 ns, and building the texts it reads costs more
than parsing a small body; most bodies hold nothing, and this says so first. `_prefilter.c`
(compiled at install) walks the parsed JSON under the roots the texts live in (every str
there, a superset of the texts guardrails look at) and stops only at the bytes a candidate
cannot do without. It never says no where the detectors would find a candidate (the test
suite checks it against their pattern); without the compiled module (an install without a C
compiler) it always says maybe. Operators' patterns are never prefiltered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .detectors import CATEGORIES

try:
    from ._prefilter import maybe as maybe
except ImportError:  # pragma: no cover - built wherever the tests run

    def maybe(body: dict[str, Any], roots: tuple[str, ...], mask: int, /) -> bool:
        """Without the compiled module every body may hold something."""
        return True

    NATIVE = False
else:
    NATIVE = True

BITS = {category: 1 << index for index, category in enumerate(CATEGORIES)}


def mask(categories: Iterable[str]) -> int:
    """The bits of `categories`, as `maybe` takes them."""
    bits = 0
    for category in categories:
        bits |= BITS[category]
    return bits
