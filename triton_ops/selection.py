"""Host-side math of the TIES magnitude trim, shared by the kernels and the torch path.

"Keep the k largest |delta|" becomes a radix select on integers: with the sign bit cleared, the bit
pattern of a non-negative float orders like its value. The select finds the k-th largest key; of
the entries equal to it, the lowest indices are kept, so the kept set does not depend on launch or
chunk order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DIGIT_BITS = 16


def kept_count(density: float, numel: int) -> int:
    """Entries a magnitude trim keeps, exactly as mergekit counts them (`int()` truncates)."""
    if density >= 1.0:
        return numel
    return max(1, int(density * numel))


@dataclass(frozen=True)
class MagnitudeThreshold:
    """Keep |delta| keys above `key`, plus the first `ties_kept` entries equal to it."""

    key: int
    ties_kept: int
    ties_total: int

    @classmethod
    def keep_all(cls) -> MagnitudeThreshold:
        return cls(key=-1, ties_kept=0, ties_total=0)

    @property
    def breaks_ties(self) -> bool:
        return self.ties_kept < self.ties_total


def magnitude_key(delta: torch.Tensor) -> torch.Tensor:
    """|delta|'s bit pattern as a non-negative integer tensor (int16 or int32)."""
    if delta.dtype == torch.float32:
        return delta.view(torch.int32) & 0x7FFFFFFF
    return delta.view(torch.int16) & 0x7FFF


def magnitude_threshold(key: torch.Tensor, k: int, key_bits: int) -> MagnitudeThreshold:
    """Radix-select the k-th largest key (1 <= k <= key.numel()) of one in-memory key tensor."""
    return radix_select(lambda: iter((key,)), k, key_bits)


def radix_select(keys, k: int, key_bits: int, check_top_digit=None) -> MagnitudeThreshold:
    """Most significant 16-bit digit first: histogram the candidates, pick the digit holding the
    k-th largest, keep only that digit's entries as candidates for the next digit."""
    remaining, prefix, high = k, 0, key_bits
    while high > 0:
        shift = max(0, high - _DIGIT_BITS)
        width = high - shift
        counts = None
        for key in keys():
            in_prefix = (key >> high) == prefix if high < key_bits else None
            digits = (key >> shift) & ((1 << width) - 1)
            if in_prefix is not None:
                digits = digits[in_prefix]
            histogram = torch.bincount(digits, minlength=1 << width)
            counts = histogram if counts is None else counts + histogram
        if check_top_digit is not None and high == key_bits:
            check_top_digit(counts, shift)
        at_or_above = counts.flip(0).cumsum(0)
        position = int(torch.searchsorted(at_or_above, remaining))
        digit = (1 << width) - 1 - position
        remaining -= int(at_or_above[position]) - int(counts[digit])
        prefix = (prefix << width) | digit
        high = shift
    return MagnitudeThreshold(key=prefix, ties_kept=remaining, ties_total=int(counts[digit]))


def magnitude_keep(
    key: torch.Tensor, threshold: MagnitudeThreshold, ties_before: int
) -> tuple[torch.Tensor, int]:
    """Keep mask of one chunk and the number of threshold ties in it."""
    if not threshold.breaks_ties:
        return key >= threshold.key, 0
    ties = key == threshold.key
    rank = torch.cumsum(ties, 0, dtype=torch.int64) - ties.long() + ties_before
    return (key > threshold.key) | (ties & (rank < threshold.ties_kept)), int(ties.sum())
