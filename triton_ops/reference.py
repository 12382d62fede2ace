"""Torch reference of the merges in docs/numerics.md; also the CPU path.

It computes exactly what the kernels compute, in the same order: deltas rounded to the compute
dtype, fp32 accumulation over experts in index order, one rounding at the end. Memory stays lean:
every pass walks the tensor in chunks, so no `[k, numel]` buffer or int64 index array exists.

The magnitude trim is a radix select on the bit pattern of |delta| (`torch.bincount` over 16-bit
digits), O(numel) per expert, with ties at the threshold kept lowest index first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .inputs import KEY_BITS, NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .philox import expert_key, keep_threshold, philox_uniform32
from .scales import dare_factors, linear_divisor
from .selection import (
    MagnitudeThreshold,
    kept_count,
    magnitude_keep,
    magnitude_key,
    radix_select,
)

CHUNK = 1 << 18


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
