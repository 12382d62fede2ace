"""Fused TIES merge: exact per-expert magnitude trim, sign election and disjoint mean.

Passes over the inputs (each reads the base and the trimmed experts once):
1. Radix select, one launch per 8-bit digit of |delta|'s bit pattern (2 for bf16/fp16, 4 for
   fp32): a block histogram of the candidates' digit, added to a global [k, 256] histogram; torch
   then picks the digit holding each expert's k-th largest on the device. The first digit pass also
   counts non-finite deltas.
2. Only when some expert must drop part of the entries tied at its threshold: count the ties per
   block, so the merge pass can keep them lowest index first.
3. The merge: trim, weight, elect signs and average the agreeing deltas in one loop over the
   experts with fp32 per-sign accumulators, then add the base and write the output once. It also
   counts non-finite deltas of the experts the select pass did not read (density 1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import KEY_BITS, NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .kernel_utils import (
    accumulate_signed,
    block_offsets,
    count_nonfinite,
    elect_and_mix,
    expert_pointer_table,
    float32_table,
    load_delta,
    magnitude_key,
    merge_grid,
    store_merged,
)
from .selection import kept_count

BLOCK = 2048
NUM_WARPS = 8
RADIX_BITS = 8
NUM_BINS = 1 << RADIX_BITS


@triton.jit
def _radix_histogram_kernel(
    base_ptr,
    expert_ptrs,
    prefix_ptr,
    histogram_ptr,
    nonfinite_ptr,
    numel,
    num_experts,
    shift,
    high,
    NONFINITE_KEY: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Histogram digit (key >> shift) of the keys whose bits from `high` up equal the prefix."""
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    digit_mask = (1 << (high - shift)) - 1
    for i in range(num_experts):
        delta = load_delta(base, expert_ptrs, i, offsets, in_bounds)
        key = magnitude_key(delta)
        candidate = in_bounds & ((key >> high).to(tl.int64) == tl.load(prefix_ptr + i))
        counts = tl.histogram((key >> shift) & digit_mask, NUM_BINS, mask=candidate)
        # int64: one bin can hold more than 2**31 entries (e.g. zero deltas of a huge embedding).
        tl.atomic_add(histogram_ptr + i * NUM_BINS + tl.arange(0, NUM_BINS), counts.to(tl.int64))
        if COUNT_NONFINITE:
            tl.atomic_add(nonfinite_ptr + i, count_nonfinite(delta, NONFINITE_KEY))


@triton.jit
def _threshold_ties_kernel(
    base_ptr, expert_ptrs, threshold_ptr, ties_ptr, numel, num_experts, BLOCK: tl.constexpr
):
    """Per block and expert: how many |delta| keys equal the expert's threshold key."""
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    num_blocks = tl.num_programs(0)
    for i in range(num_experts):
        key = magnitude_key(load_delta(base, expert_ptrs, i, offsets, in_bounds)).to(tl.int64)
        ties = in_bounds & (key == tl.load(threshold_ptr + i))
        tl.store(ties_ptr + i * num_blocks + tl.program_id(0), tl.sum(ties.to(tl.int64)))


@triton.jit
def _ties_merge_kernel(
    base_ptr,
    expert_ptrs,
    out_ptr,
    weight_ptr,
    threshold_ptr,
    ties_kept_ptr,
    ties_before_ptr,
    nonfinite_ptr,
    numel,
    num_experts,
    lambda_,
    NORMALIZE: tl.constexpr,
    APPLY_LAMBDA: tl.constexpr,
    BREAK_TIES: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
    NONFINITE_KEY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    positive = tl.zeros((BLOCK,), tl.float32)
    negative = tl.zeros((BLOCK,), tl.float32)
    positive_weight = tl.zeros((BLOCK,), tl.float32)
    negative_weight = tl.zeros((BLOCK,), tl.float32)
    num_blocks = tl.num_programs(0)
    for i in range(num_experts):
        delta = load_delta(base, expert_ptrs, i, offsets, in_bounds)
        key = magnitude_key(delta).to(tl.int64)
        threshold = tl.load(threshold_ptr + i)
        if BREAK_TIES:
            ties = in_bounds & (key == threshold)
            tie_rank = (
                tl.cumsum(ties.to(tl.int64), 0)
                - ties.to(tl.int64)
                + tl.load(ties_before_ptr + i * num_blocks + tl.program_id(0))
            )
            keep = (key > threshold) | (ties & (tie_rank < tl.load(ties_kept_ptr + i)))
        else:
            keep = key >= threshold
        if COUNT_NONFINITE:
            tl.atomic_add(nonfinite_ptr + i, count_nonfinite(delta, NONFINITE_KEY))
        weight = tl.load(weight_ptr + i)
        weighted = tl.where(keep, delta.to(tl.float32) * weight, 0.0)
        positive, negative, positive_weight, negative_weight = accumulate_signed(
            weighted, weight, positive, negative, positive_weight, negative_weight
        )
    mixed = elect_and_mix(positive, negative, positive_weight, negative_weight, NORMALIZE)
    store_merged(out_ptr, offsets, in_bounds, base, mixed, lambda_, APPLY_LAMBDA)


def ties_merge_triton(inputs: MergeInputs, *, normalize: bool, lambda_: float) -> torch.Tensor:
    out = torch.empty_like(inputs.base)
    if inputs.numel == 0:
        return out.view(inputs.shape)
    device = inputs.base.device
    k = inputs.num_experts
    threshold = torch.full((k,), -1, dtype=torch.int64, device=device)
    ties_kept = torch.zeros(k, dtype=torch.int64, device=device)
    ties_total = torch.zeros(k, dtype=torch.int64, device=device)
    trimmed = [
        i for i, d in enumerate(inputs.densities) if kept_count(d, inputs.numel) < inputs.numel
    ]
    if trimmed:
        index = torch.tensor(trimmed, device=device)
        selected = _radix_select(inputs, trimmed)
        threshold[index], ties_kept[index], ties_total[index] = selected
    break_ties = bool((ties_kept < ties_total).any())
    pointers = expert_pointer_table(inputs.experts)
    grid = merge_grid(inputs, BLOCK)
    ties_before = torch.zeros(0, dtype=torch.int64, device=device)
    if break_ties:
        ties = torch.empty((k, grid[0]), dtype=torch.int64, device=device)
        _threshold_ties_kernel[grid](
            inputs.base,
            pointers,
            threshold,
            ties,
            inputs.numel,
            k,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        ties_before = ties.cumsum(1) - ties
        ties_kept = torch.where(ties_kept < ties_total, ties_kept, ties.sum(1))
    nonfinite = torch.zeros(k, dtype=torch.int32, device=device)
    _ties_merge_kernel[grid](
        inputs.base,
        pointers,
        out,
        float32_table(inputs.weights, device),
        threshold,
        ties_kept,
        ties_before,
        nonfinite,
        inputs.numel,
        k,
        lambda_,
        NORMALIZE=normalize,
        APPLY_LAMBDA=lambda_ != 1.0,
        BREAK_TIES=break_ties,
        COUNT_NONFINITE=len(trimmed) < k,
        NONFINITE_KEY=NONFINITE_KEY[inputs.base.dtype],
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    if len(trimmed) < k:
        raise_for_nonfinite(inputs.base, nonfinite.tolist())
    return out.view(inputs.shape)


def _radix_select(
    inputs: MergeInputs, trimmed: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold key, ties to keep and ties present, per trimmed expert, decided on the device."""
    device = inputs.base.device
    dtype = inputs.base.dtype
    experts = tuple(inputs.experts[i] for i in trimmed)
    counts = [kept_count(inputs.densities[i], inputs.numel) for i in trimmed]
    pointers = expert_pointer_table(experts)
    remaining = torch.tensor(counts, dtype=torch.int64, device=device)
    prefix = torch.zeros_like(remaining)
    histogram = torch.empty((len(trimmed), NUM_BINS), dtype=torch.int64, device=device)
    nonfinite = torch.zeros(len(trimmed), dtype=torch.int32, device=device)
    key_bits = KEY_BITS[dtype]
    high = key_bits
    while high > 0:
        shift = max(0, high - RADIX_BITS)
        histogram.zero_()
        _radix_histogram_kernel[merge_grid(inputs, BLOCK)](
            inputs.base,
            pointers,
            prefix,
            histogram,
            nonfinite,
            inputs.numel,
            len(trimmed),
            shift,
            high,
            NONFINITE_KEY=NONFINITE_KEY[dtype],
            COUNT_NONFINITE=high == key_bits,
            NUM_BINS=NUM_BINS,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        if high == key_bits:
            _check_finite(inputs, trimmed, nonfinite)
        at_or_above = histogram.flip(1).cumsum(1)
        position = (at_or_above < remaining[:, None]).sum(1)
        digit = NUM_BINS - 1 - position
        remaining = remaining - (
            at_or_above.gather(1, position[:, None]).squeeze(1)
            - histogram.gather(1, digit[:, None]).squeeze(1)
        )
        prefix = (prefix << (high - shift)) | digit
        high = shift
    ties_total = histogram.gather(1, digit[:, None]).squeeze(1)
    return prefix, remaining, ties_total


def _check_finite(inputs: MergeInputs, trimmed: list[int], nonfinite: torch.Tensor) -> None:
    counts = [0] * inputs.num_experts
    for i, count in zip(trimmed, nonfinite.tolist(), strict=True):
        counts[i] = count
    raise_for_nonfinite(inputs.base, counts)
