"""The one parser of k values (numbers of merged experts), for the sweep YAML and the CLI.

>>> parse_k("1-3,8"), parse_k([4, 2, 2]), parse_k(5)
([1, 2, 3, 8], [2, 4], [5])
"""

from __future__ import annotations

import re
from typing import Any

from .errors import UserError

MAX_K = 100_000
_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")


def parse_k(value: Any) -> list[int]:
    """``"1-9"``, ``"1,2,4"``, ``"1-3,8"``, ``[1, 2, 4]`` or ``3`` -> sorted distinct k >= 1."""
    if isinstance(value, int) and not isinstance(value, bool):
        ks = {value}
    elif isinstance(value, list) and value and all(type(v) is int for v in value):
        ks = set(value)
    elif isinstance(value, str) and value.strip():
        ks = set()
        for part in value.split(","):
            match = _RANGE.fullmatch(part)
            if match is None:
                raise UserError(f"k={value!r}: use a range like 1-9, a list like 1,2,4, or both.")
            low, high = int(match[1]), int(match[2] or match[1])
            if low > high:
                raise UserError(f"k={value!r}: {part.strip()} is an empty range; write low-high.")
            if high > MAX_K:
                raise UserError(f"k={value!r}: k goes up to {high}; at most {MAX_K} is allowed.")
            ks.update(range(low, high + 1))
    else:
        raise UserError(f"k={value!r}: use a range like 1-9, a list [1, 2, 4] or a number.")
    if min(ks) < 1:
        raise UserError(f"k={value!r}: every k must be at least 1.")
    return sorted(ks)
