"""Fused magnitude-trim merges: TIES and Model Breadcrumbs (a window of |delta| ranks per expert).

Passes over the inputs (each reads the base and the trimmed experts once):
1. Radix select, one launch per 8-bit digit of |delta|'s bit pattern (2 for bf16/fp16, 4 for
   fp32, 8 for float64): a block histogram of each bound's candidates, added to a global
   [bounds, 256] histogram; torch then picks the digit holding each bound's rank on the device.
   TIES has one bound per trimmed expert (its last kept rank), Breadcrumbs two (the first kept
   rank, after the outliers, and the last). The first digit pass also counts non-finite deltas.
2. Only when a bound splits the entries tied at it: count the ties per block and bound, so the
   later passes keep them lowest index first.
3. Only with `rescale`: per block and expert, sum |delta| and sum |kept delta| (mergekit's L1
   matching), summed in float64 by torch.
4. The merge (merge_pass): trim, weight, elect signs (TIES, Breadcrumbs-TIES) and combine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import KEY_BITS, NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .kernel_utils import (
    KEY_SENTINEL,
    accumulator,
    block_offsets,
    count_nonfinite,
    expert_pointer_table,
    expert_window_keep,
    load_delta,
    magnitude_key,
    merge_grid,
)
from .merge_pass import BLOCK, NUM_WARPS, WindowTables, launch_merge
from .scales import l1_scale
from .selection import RankWindow

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
    num_bounds,
    shift,
    high,
    ACC: tl.constexpr,
    NONFINITE_KEY: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
    NUM_BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per bound: histogram digit (key >> shift) of the keys whose bits from `high` up equal the
    bound's prefix (`expert_ptrs` holds each bound's expert)."""
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    digit_mask = (1 << (high - shift)) - 1
    for j in range(num_bounds):
        delta = load_delta(base, expert_ptrs, j, offsets, in_bounds, ACC, False)
        key = magnitude_key(delta).to(tl.int64)
        candidate = in_bounds & ((key >> high) == tl.load(prefix_ptr + j))
        counts = tl.histogram(((key >> shift) & digit_mask).to(tl.int32), NUM_BINS, mask=candidate)
        # int64: one bin can hold more than 2**31 entries (e.g. zero deltas of a huge embedding).
        tl.atomic_add(histogram_ptr + j * NUM_BINS + tl.arange(0, NUM_BINS), counts.to(tl.int64))
        if COUNT_NONFINITE:
            tl.atomic_add(nonfinite_ptr + j, count_nonfinite(delta, NONFINITE_KEY))


@triton.jit
def _bound_ties_kernel(
    base_ptr, expert_ptrs, bound_ptr, ties_ptr, numel, num_bounds, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Per block and bound: how many |delta| keys equal the bound's key."""
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    num_blocks = tl.num_programs(0)
    for j in range(num_bounds):
        delta = load_delta(base, expert_ptrs, j, offsets, in_bounds, ACC, False)
        ties = in_bounds & (magnitude_key(delta).to(tl.int64) == tl.load(bound_ptr + j))
        tl.store(ties_ptr + j * num_blocks + tl.program_id(0), tl.sum(ties.to(tl.int64)))


@triton.jit
def _window_l1_kernel(
    base_ptr,
    expert_ptrs,
    lower_ptr,
    lower_keep_ptr,
    lower_before_ptr,
    upper_ptr,
    upper_skip_ptr,
    upper_before_ptr,
    partial_ptr,
    numel,
    num_experts,
    ACC: tl.constexpr,
    BREAK_TIES: tl.constexpr,
    TWO_SIDED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per block and expert: sum |delta| and sum |kept delta| (the window's keep rule)."""
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    block = tl.program_id(0)
    num_blocks = tl.num_programs(0)
    for i in range(num_experts):
        delta = load_delta(base, expert_ptrs, i, offsets, in_bounds, ACC, False)
        keep = expert_window_keep(
            magnitude_key(delta).to(tl.int64),
            in_bounds,
            i,
            block,
            num_blocks,
            lower_ptr,
            lower_keep_ptr,
            lower_before_ptr,
            upper_ptr,
            upper_skip_ptr,
            upper_before_ptr,
            BREAK_TIES,
            TWO_SIDED,
        )
        magnitude = tl.abs(delta.to(ACC))
        row = partial_ptr + 2 * i * num_blocks + block
        tl.store(row, tl.sum(magnitude))
        tl.store(row + num_blocks, tl.sum(tl.where(keep, magnitude, 0.0)))


def magnitude_merge_triton(
    inputs: MergeInputs,
    windows: list[RankWindow],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    if inputs.numel == 0:
        return torch.empty_like(inputs.base).view(inputs.shape)
    tables, selected = _window_tables(inputs, windows)
    factors = list(inputs.weights)
    if rescale:
        factors = [
            w * l1_scale(*sums) for w, sums in zip(factors, _l1_sums(inputs, tables), strict=True)
        ]
    return launch_merge(
        inputs,
        factors,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        # Experts the select pass did not read (kept whole) are checked in the merge.
        check_finite=len(selected) < inputs.num_experts,
        window=tables,
    )


def _window_tables(inputs: MergeInputs, windows: list[RankWindow]) -> tuple[WindowTables, set[int]]:
    """The device tables of the windows' bounds, and the experts whose deltas were selected on."""
    device = inputs.base.device
    k = inputs.num_experts
    lower = torch.full((k,), -1, dtype=torch.int64, device=device)
    lower_keep = torch.full((k,), inputs.numel + 1, dtype=torch.int64, device=device)
    upper = torch.full((k,), KEY_SENTINEL, dtype=torch.int64, device=device)
    upper_skip = torch.zeros(k, dtype=torch.int64, device=device)
    # Bounds to select: (expert, rank, side); side 0 is the lower bound, 1 the upper.
    bounds = []
    for i, window in enumerate(windows):
        if window.keeps_none:
            lower[i] = KEY_SENTINEL
        elif not window.keeps_all:
            if window.lo > 0:
                bounds.append((i, window.lo, 1))
            if window.hi < window.numel:
                bounds.append((i, window.hi - 1, 0))
    two_sided = any(side == 1 for _, _, side in bounds)
    grid = merge_grid(inputs, BLOCK)
    lower_before = upper_before = torch.zeros(0, dtype=torch.int64, device=device)
    break_ties = False
    if bounds:
        keys, positions, totals = _radix_select(inputs, bounds)
        experts = torch.tensor([i for i, _, _ in bounds], device=device)
        sides = [side for _, _, side in bounds]
        is_upper = torch.tensor(sides, device=device) == 1
        lower[experts[~is_upper]] = keys[~is_upper]
        upper[experts[is_upper]] = keys[is_upper]
        # Ties kept at a lower bound: those up to the bound's position; skipped at an upper bound:
        # those before its position. Only a bound that splits its ties needs the tie counts.
        splits = torch.where(is_upper, positions > 0, positions + 1 < totals)
        break_ties = bool(splits.any())
        if break_ties:
            ties = _bound_ties(inputs, bounds, keys, grid[0])
            before = ties.cumsum(1) - ties
            lower_keep[experts[~is_upper]] = torch.where(
                splits[~is_upper], positions[~is_upper] + 1, inputs.numel + 1
            )
            upper_skip[experts[is_upper]] = torch.where(splits[is_upper], positions[is_upper], 0)
            lower_before = torch.zeros((k, grid[0]), dtype=torch.int64, device=device)
            upper_before = torch.zeros_like(lower_before)
            lower_before[experts[~is_upper]] = before[~is_upper]
            upper_before[experts[is_upper]] = before[is_upper]
    tables = WindowTables(
        lower, lower_keep, lower_before, upper, upper_skip, upper_before, break_ties, two_sided
    )
    return tables, {i for i, _, _ in bounds}


def _radix_select(
    inputs: MergeInputs, bounds: list[tuple[int, int, int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key, position among its ties and tie count of each bound's rank, decided on the device."""
    device = inputs.base.device
    dtype = inputs.base.dtype
    pointers = expert_pointer_table(tuple(inputs.experts[i] for i, _, _ in bounds))
    remaining = torch.tensor([rank + 1 for _, rank, _ in bounds], dtype=torch.int64, device=device)
    prefix = torch.zeros_like(remaining)
    histogram = torch.empty((len(bounds), NUM_BINS), dtype=torch.int64, device=device)
    nonfinite = torch.zeros(len(bounds), dtype=torch.int32, device=device)
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
            len(bounds),
            shift,
            high,
            ACC=accumulator(inputs),
            NONFINITE_KEY=NONFINITE_KEY[dtype],
            COUNT_NONFINITE=high == key_bits,
            NUM_BINS=NUM_BINS,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
        if high == key_bits:
            _check_finite(inputs, bounds, nonfinite)
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
    return prefix, remaining - 1, ties_total


def _bound_ties(
    inputs: MergeInputs, bounds: list[tuple[int, int, int]], keys: torch.Tensor, blocks: int
) -> torch.Tensor:
    ties = torch.empty((len(bounds), blocks), dtype=torch.int64, device=keys.device)
    _bound_ties_kernel[(blocks,)](
        inputs.base,
        expert_pointer_table(tuple(inputs.experts[i] for i, _, _ in bounds)),
        keys,
        ties,
        inputs.numel,
        len(bounds),
        ACC=accumulator(inputs),
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return ties


def _l1_sums(inputs: MergeInputs, tables: WindowTables) -> list[tuple[float, float]]:
    grid = merge_grid(inputs, BLOCK)
    device = inputs.base.device
    partial = torch.zeros(
        (inputs.num_experts, 2, grid[0]), dtype=inputs.accumulator_dtype, device=device
    )
    unused = torch.zeros(1, dtype=torch.int64, device=device)
    _window_l1_kernel[grid](
        inputs.base,
        expert_pointer_table(inputs.experts),
        tables.lower,
        tables.lower_keep,
        tables.lower_before if tables.break_ties else unused,
        tables.upper,
        tables.upper_skip,
        tables.upper_before if tables.break_ties and tables.two_sided else unused,
        partial,
        inputs.numel,
        inputs.num_experts,
        ACC=accumulator(inputs),
        BREAK_TIES=tables.break_ties,
        TWO_SIDED=tables.two_sided,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    return [tuple(pair) for pair in partial.sum(2, dtype=torch.float64).tolist()]


def _check_finite(
    inputs: MergeInputs, bounds: list[tuple[int, int, int]], nonfinite: torch.Tensor
) -> None:
    counts = [0] * inputs.num_experts
    for (i, _, _), count in zip(bounds, nonfinite.tolist(), strict=True):
        counts[i] = max(counts[i], count)
    raise_for_nonfinite(inputs.base, counts)
