"""Host-side math of the magnitude trims (TIES, Breadcrumbs), shared by kernels and torch path.

An expert's entries are ranked by |delta|, largest first, and among equal |delta| by index, lowest
first: a total order, so every backend, block and chunk size keeps the same entries. A trim keeps
a window of ranks [lo, hi): TIES the top `max(1, int(density * numel))`, Model Breadcrumbs the
`int(density * numel)` that follow the `int(gamma * numel)` largest, with mergekit's counts.

"The entry of rank r" is found by a radix select on integers: with the sign bit cleared, the bit
pattern of a non-negative float orders like its value. The select gives that entry's key and its
position among the entries sharing the key; the window's two bounds follow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

_DIGIT_BITS = 16


@dataclass(frozen=True)
class RankWindow:
    """Keep the entries of ranks lo .. hi-1 (0 is the largest |delta|) of `numel` entries."""

    lo: int
    hi: int
    numel: int

    @property
    def keeps_all(self) -> bool:
        return self.lo <= 0 and self.hi >= self.numel

    @property
    def keeps_none(self) -> bool:
        return self.hi <= self.lo or self.numel == 0


def kept_count(density: float, numel: int) -> int:
    """Entries a TIES trim keeps, exactly as mergekit counts them (`int()` truncates)."""
    if density >= 1.0:
        return numel
    return max(1, int(density * numel))


def top_window(density: float, numel: int) -> RankWindow:
    """TIES: the `kept_count` largest."""
    return RankWindow(0, kept_count(density, numel), numel)


def outlier_window(density: float, gamma: float, numel: int) -> RankWindow:
    """Model Breadcrumbs, as mergekit's `magnitude_outliers` counts: drop the `int(gamma * numel)`
    largest, keep the next `int(density * numel)`; when both do not fit, fewer outliers go."""
    if density >= 1.0:
        return RankWindow(0, numel, numel)
    target, top = int(density * numel), int(gamma * numel)
    bottom = max(0, numel - target - top)
    return RankWindow(numel - min(numel, bottom + target), numel - bottom, numel)


@dataclass(frozen=True)
class Bound:
    """The entry of one rank: its |delta| key, its position among the entries with that key
    (by index) and how many entries have that key."""

    key: int
    position: int
    ties: int


@dataclass(frozen=True)
class MagnitudeWindow:
    """A rank window as key bounds: keep keys strictly between `upper` and `lower`; of the entries
    at `upper.key` the ones from position `upper.position` on, of those at `lower.key` the ones up
    to position `lower.position`. None: no bound on that side."""

    upper: Bound | None
    lower: Bound | None
    keeps_none: bool = False

    @classmethod
    def everything(cls) -> MagnitudeWindow:
        return cls(upper=None, lower=None)

    @classmethod
    def nothing(cls) -> MagnitudeWindow:
        return cls(upper=None, lower=None, keeps_none=True)

    @property
    def keeps_all(self) -> bool:
        return self.upper is None and self.lower is None and not self.keeps_none

    @property
    def splits_lower_ties(self) -> bool:
        return self.lower is not None and self.lower.position + 1 < self.lower.ties

    @property
    def splits_upper_ties(self) -> bool:
        return self.upper is not None and self.upper.position > 0


def magnitude_key(delta: torch.Tensor) -> torch.Tensor:
    """|delta|'s bit pattern as a non-negative integer tensor (int16, int32 or int64)."""
    if delta.dtype == torch.float64:
        return delta.view(torch.int64) & 0x7FFFFFFFFFFFFFFF
    if delta.dtype == torch.float32:
        return delta.view(torch.int32) & 0x7FFFFFFF
    return delta.view(torch.int16) & 0x7FFF


KeyChunks = Callable[[], Iterable[torch.Tensor]]


def window_bounds(
    keys: KeyChunks,
    window: RankWindow,
    key_bits: int,
    check_top_digit: Callable[[torch.Tensor, int], None] | None = None,
) -> MagnitudeWindow:
    """The key bounds of a rank window over the keys `keys()` yields (one pass per digit).

    A window that keeps all or nothing needs no pass (and gets no `check_top_digit` call)."""
    if window.keeps_none:
        return MagnitudeWindow.nothing()
    if window.keeps_all:
        return MagnitudeWindow.everything()
    has_upper, has_lower = window.lo > 0, window.hi < window.numel
    ranks = [window.lo] * has_upper + [window.hi - 1] * has_lower
    bounds = radix_select(keys, ranks, key_bits, check_top_digit)
    return MagnitudeWindow(
        upper=bounds[0] if has_upper else None, lower=bounds[-1] if has_lower else None
    )


def radix_select(
    keys: KeyChunks,
    ranks: list[int],
    key_bits: int,
    check_top_digit: Callable[[torch.Tensor, int], None] | None = None,
) -> list[Bound]:
    """The entries of the given ranks, most significant 16-bit digit first: histogram each rank's
    candidates, keep the digit holding the rank, narrow the candidates to it for the next digit.
    `check_top_digit(counts, shift)` sees the first digit's full histogram (non-finite keys)."""
    remaining = [rank + 1 for rank in ranks]  # entries at or above the rank still to place
    prefixes = [0] * len(ranks)
    ties = [0] * len(ranks)
    high = key_bits
    while high > 0:
        shift = max(0, high - _DIGIT_BITS)
        histograms = _digit_histograms(keys, prefixes, high, shift, key_bits)
        if check_top_digit is not None and high == key_bits:
            check_top_digit(histograms[0], shift)
        for j, counts in enumerate(histograms):
            at_or_above = counts.flip(0).cumsum(0)
            position = int(torch.searchsorted(at_or_above, remaining[j]))
            digit = counts.numel() - 1 - position
            remaining[j] -= int(at_or_above[position]) - int(counts[digit])
            prefixes[j] = (prefixes[j] << (high - shift)) | digit
            ties[j] = int(counts[digit])
        high = shift
    return [
        Bound(key, left - 1, tied)
        for key, left, tied in zip(prefixes, remaining, ties, strict=True)
    ]


def _digit_histograms(
    keys: KeyChunks, prefixes: list[int], high: int, shift: int, key_bits: int
) -> list[torch.Tensor]:
    """One histogram of digit (key >> shift) per distinct prefix, over the keys matching it."""
    bins = 1 << (high - shift)
    distinct = list(dict.fromkeys(prefixes))
    totals: dict[int, torch.Tensor] = {}
    for key in keys():
        digits = key if shift == 0 and high == key_bits else (key >> shift) & (bins - 1)
        for prefix in distinct:
            chosen = digits
            if high < key_bits:
                # Entries outside the prefix count in an extra last bin (cheaper than masking).
                chosen = torch.where((key >> high) == prefix, digits, bins)
            histogram = torch.bincount(chosen.reshape(-1), minlength=bins + 1)[:bins]
            totals[prefix] = histogram + totals[prefix] if prefix in totals else histogram
    return [totals[prefix] for prefix in prefixes]


def tie_index(key_chunks: Iterable[tuple[int, torch.Tensor]], key: int, position: int) -> int:
    """The index of the entry at `position` among the entries with `key` (chunks in order, each
    with its start index)."""
    seen = 0
    for start, chunk in key_chunks:
        tied = chunk == key
        count = int(tied.sum())
        if seen + count > position:
            return start + int(torch.nonzero(tied)[position - seen])
        seen += count
    raise ValueError(f"no entry at position {position} of key {key:#x}")
