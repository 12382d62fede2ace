"""Torch reference of the merges in numerics.md; also the CPU path.

It computes exactly what the kernels compute, in the same order: deltas rounded to the compute
dtype, fp32 accumulation over experts in index order, one rounding at the end. Memory stays lean:
every pass walks the tensor in chunks, so no `[k, numel]` buffer or int64 index array exists.

The magnitude trim is a radix select on the bit pattern of |delta| (`torch.bincount` over 16-bit
digits), O(numel) per expert, with ties at the threshold kept lowest index first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .inputs import KEY_BITS, NONFINITE_KEY, MergeInputs, kept_count, raise_for_nonfinite
from .philox import expert_key, keep_threshold, philox_uniform32

CHUNK = 1 << 18
_DIGIT_BITS = 16
_RESCALE_EPS = 1e-7
_DIVISOR_EPS = 1e-8


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


def ties_merge_torch(inputs: MergeInputs, *, normalize: bool, lambda_: float) -> torch.Tensor:
    thresholds = [
        magnitude_threshold_chunked(inputs, i, kept_count(d, inputs.numel))
        for i, d in enumerate(inputs.densities)
    ]
    factors = torch.tensor(inputs.weights, dtype=torch.float32)
    ties_seen = [0] * inputs.num_experts

    def kept_deltas(start: int, stop: int) -> Iterator[torch.Tensor]:
        for i, threshold in enumerate(thresholds):
            delta = _delta(inputs, i, start, stop)
            keep, ties = magnitude_keep(magnitude_key(delta), threshold, ties_seen[i])
            ties_seen[i] += ties
            yield torch.where(keep, delta.float() * factors[i], 0.0)

    return _consensus_merge(inputs, kept_deltas, normalize=normalize, lambda_=lambda_)


def dare_merge_torch(
    inputs: MergeInputs,
    *,
    consensus: bool,
    normalize: bool,
    rescale: str | None,
    lambda_: float,
    seed: int,
    stream: int,
) -> torch.Tensor:
    keys = [expert_key(seed, stream, i) for i in range(inputs.num_experts)]
    thresholds = [keep_threshold(d) for d in inputs.densities]

    def draw(index: int, start: int, stop: int) -> torch.Tensor:
        return philox_uniform32(keys[index], start, stop - start) < thresholds[index]

    l1_sums = None
    keep = draw
    if rescale == "l1":
        # The L1 pass draws every mask once; the merge pass reuses them, packed to one bit each,
        # instead of paying for the draws again.
        l1_sums, packed = _dare_l1_sums(inputs, draw)

        def keep(index: int, start: int, stop: int) -> torch.Tensor:
            return _unpack_bits(packed[index][start // CHUNK], stop - start)

    factors = dare_factors(inputs.weights, inputs.densities, rescale, l1_sums)
    return weighted_merge_torch(
        inputs, factors, consensus=consensus, normalize=normalize, lambda_=lambda_, keep=keep
    )


def task_arithmetic_torch(inputs: MergeInputs, *, normalize: bool, lambda_: float) -> torch.Tensor:
    return weighted_merge_torch(
        inputs, list(inputs.weights), consensus=False, normalize=normalize, lambda_=lambda_
    )


def weighted_merge_torch(
    inputs: MergeInputs,
    factors: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    keep: Callable[[int, int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Merge the deltas scaled by `factors`, entries dropped where `keep(expert, start, stop)`
    is false: task arithmetic, DARE, or the last step of a merge of prepared task vectors."""
    factor_table = torch.tensor(factors, dtype=torch.float32)
    nonfinite = [0] * inputs.num_experts

    def weighted_deltas(start: int, stop: int) -> Iterator[torch.Tensor]:
        for i in range(inputs.num_experts):
            delta = _delta(inputs, i, start, stop)
            nonfinite[i] += _count_nonfinite(delta)
            weighted = delta.float() * factor_table[i]
            yield weighted if keep is None else torch.where(keep(i, start, stop), weighted, 0.0)

    if consensus:
        out = _consensus_merge(inputs, weighted_deltas, normalize=normalize, lambda_=lambda_)
    else:
        out = _linear_merge(inputs, weighted_deltas, normalize=normalize, lambda_=lambda_)
    raise_for_nonfinite(inputs.base, nonfinite)
    return out


def magnitude_key(delta: torch.Tensor) -> torch.Tensor:
    """|delta|'s bit pattern as a non-negative integer tensor (int16 or int32)."""
    if delta.dtype == torch.float32:
        return delta.view(torch.int32) & 0x7FFFFFFF
    return delta.view(torch.int16) & 0x7FFF


def magnitude_threshold(key: torch.Tensor, k: int, key_bits: int) -> MagnitudeThreshold:
    """Radix-select the k-th largest key (1 <= k <= key.numel()) of one in-memory key tensor."""
    return radix_select(lambda: iter((key,)), k, key_bits)


def magnitude_threshold_chunked(inputs: MergeInputs, index: int, k: int) -> MagnitudeThreshold:
    """The k-th largest |delta| of one expert, streamed in chunks; also its finiteness check."""
    dtype = inputs.base.dtype
    if k >= inputs.numel:
        nonfinite = sum(_count_nonfinite(delta) for delta in _delta_chunks(inputs, index))
        _raise_expert_nonfinite(inputs, index, nonfinite)
        return MagnitudeThreshold.keep_all()

    def keys() -> Iterator[torch.Tensor]:
        return (magnitude_key(delta) for delta in _delta_chunks(inputs, index))

    def check_top_digit(counts: torch.Tensor, shift: int) -> None:
        _raise_expert_nonfinite(inputs, index, int(counts[NONFINITE_KEY[dtype] >> shift :].sum()))

    return radix_select(keys, k, KEY_BITS[dtype], check_top_digit)


def dare_factors(
    weights: tuple[float, ...],
    densities: tuple[float, ...],
    rescale: str | None,
    l1_sums: list[tuple[float, float]] | None,
) -> list[float]:
    """Per-expert multiplier of a kept delta: weight times the rescale factor."""
    factors = []
    for i, (weight, density) in enumerate(zip(weights, densities, strict=True)):
        scale = 1.0
        if rescale == "inverse" and density < 1.0:
            scale = 1.0 / density
        elif rescale == "l1" and l1_sums is not None:
            before, after = l1_sums[i]
            if before >= _RESCALE_EPS and after >= _RESCALE_EPS:
                scale = before / after
        factors.append(weight * scale)
    return factors


def linear_divisor(weights: tuple[float, ...]) -> float:
    divisor = sum(weights)
    return 1.0 if abs(divisor) < _DIVISOR_EPS else divisor


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


def _consensus_merge(
    inputs: MergeInputs, kept_deltas, *, normalize: bool, lambda_: float
) -> torch.Tensor:
    """Elect the sign of the summed deltas, then average the deltas that agree with it.

    Positive and negative deltas accumulate separately, so the elected side and its divisor are
    known after a single pass over the experts (the kernels do the same).
    """
    out = torch.empty_like(inputs.base)
    for start, stop in _chunks(inputs.numel):
        positive = torch.zeros(stop - start, dtype=torch.float32)
        negative = torch.zeros_like(positive)
        positive_weight = torch.zeros_like(positive)
        negative_weight = torch.zeros_like(positive)
        for i, delta in enumerate(kept_deltas(start, stop)):
            # The same sums as the kernel's where(delta > 0, delta, 0) form, in fewer passes:
            # clamp only differs on -0.0, which adds nothing, and weight * True is the weight.
            positive.add_(delta.clamp(min=0))
            negative.add_(delta.clamp(max=0))
            positive_weight.add_(delta > 0, alpha=inputs.weights[i])
            negative_weight.add_(delta < 0, alpha=inputs.weights[i])
        elected_positive = positive + negative >= 0
        mixed = torch.where(elected_positive, positive, negative)
        if normalize:
            divisor = torch.where(elected_positive, positive_weight, negative_weight)
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        out[start:stop] = _finish(inputs, start, stop, mixed, lambda_)
    return out.view(inputs.shape)


def _linear_merge(
    inputs: MergeInputs, weighted_deltas, *, normalize: bool, lambda_: float
) -> torch.Tensor:
    out = torch.empty_like(inputs.base)
    divisor = torch.tensor(linear_divisor(inputs.weights), dtype=torch.float32)
    for start, stop in _chunks(inputs.numel):
        mixed = torch.zeros(stop - start, dtype=torch.float32)
        for delta in weighted_deltas(start, stop):
            mixed += delta
        if normalize:
            mixed = mixed / divisor
        out[start:stop] = _finish(inputs, start, stop, mixed, lambda_)
    return out.view(inputs.shape)


def _finish(
    inputs: MergeInputs, start: int, stop: int, mixed: torch.Tensor, lambda_: float
) -> torch.Tensor:
    if lambda_ != 1.0:
        mixed = mixed * torch.tensor(lambda_, dtype=torch.float32)
    return (inputs.base[start:stop].float() + mixed).to(inputs.base.dtype)


def _dare_l1_sums(
    inputs: MergeInputs, draw: Callable[[int, int, int], torch.Tensor]
) -> tuple[list[tuple[float, float]], list[list[torch.Tensor]]]:
    """Per expert: (sum |delta|, sum |kept delta|), the L1 norms mergekit's rescale matches,
    and the keep masks drawn on the way, packed per chunk."""
    sums, packed = [], []
    for i in range(inputs.num_experts):
        before = after = 0.0
        nonfinite = 0
        masks = []
        for start, stop in _chunks(inputs.numel):
            delta = _delta(inputs, i, start, stop)
            nonfinite += _count_nonfinite(delta)
            magnitude = delta.abs().float()
            keep = draw(i, start, stop)
            masks.append(_pack_bits(keep))
            before += float(magnitude.sum(dtype=torch.float64))
            after += float(torch.where(keep, magnitude, 0.0).sum(dtype=torch.float64))
        _raise_expert_nonfinite(inputs, i, nonfinite)
        sums.append((before, after))
        packed.append(masks)
    return sums, packed


_BIT_VALUES = 1 << torch.arange(8, dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(mask, (0, -mask.numel() % 8)).view(-1, 8)
    return (padded.to(torch.uint8) * _BIT_VALUES).sum(1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    bits = packed.unsqueeze(1).bitwise_and(_BIT_VALUES)
    return bits.view(-1)[:count] != 0


def _count_nonfinite(delta: torch.Tensor) -> int:
    if bool(torch.isfinite(delta).all()):
        return 0
    return int((magnitude_key(delta) >= NONFINITE_KEY[delta.dtype]).sum())


def _raise_expert_nonfinite(inputs: MergeInputs, index: int, count: int) -> None:
    if count:
        counts = [0] * inputs.num_experts
        counts[index] = count
        raise_for_nonfinite(inputs.base, counts)


def _delta(inputs: MergeInputs, index: int, start: int, stop: int) -> torch.Tensor:
    """Expert minus base in the compute dtype, as mergekit forms it (no upcast)."""
    if inputs.task_vectors:
        return inputs.experts[index][start:stop]
    return inputs.experts[index][start:stop] - inputs.base[start:stop]


def _delta_chunks(inputs: MergeInputs, index: int) -> Iterator[torch.Tensor]:
    for start, stop in _chunks(inputs.numel):
        yield _delta(inputs, index, start, stop)


def _chunks(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, CHUNK):
        yield start, min(start + CHUNK, numel)
