"""The fused merge pass every method ends with: one read of the base and the (kept) deltas, one
write of the output.

`base + lambda * merge_i(factor_i * keep_i * delta_i)`, where the merge is a plain sum (optionally
over the summed weights) or TIES' sign election and disjoint mean, accumulated in fp32 (float64 for
float64 inputs). The keep rule is none (task arithmetic), DARE's counter-based draws (RANDOM) or
a magnitude window with exact tie ranks (TIES, Breadcrumbs); a merge of prepared task vectors
(`merge_task_vectors`) reads deltas instead of expert weights (TASK_VECTORS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .inputs import NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .kernel_utils import (
    accumulate_signed,
    accumulator,
    block_offsets,
    count_nonfinite,
    elect_and_mix,
    expert_pointer_table,
    expert_window_keep,
    factor_table,
    load_delta,
    magnitude_key,
    merge_grid,
    random_keep,
    store_merged,
)
from .scales import linear_divisor

BLOCK = 2048
NUM_WARPS = 8
KEEP_ALL, KEEP_RANDOM, KEEP_WINDOW = 0, 1, 2


@dataclass(frozen=True)
class RandomKeepTables:
    """DARE on the device: [k, words] word keys and [k] 31-bit thresholds."""

    word_keys: torch.Tensor
    thresholds: torch.Tensor


@dataclass(frozen=True)
class WindowTables:
    """Magnitude windows on the device ([k] bounds, [k, blocks] ties in earlier blocks)."""

    lower: torch.Tensor
    lower_keep: torch.Tensor
    lower_before: torch.Tensor
    upper: torch.Tensor
    upper_skip: torch.Tensor
    upper_before: torch.Tensor
    break_ties: bool
    two_sided: bool


@triton.jit
def _merge_kernel(
    base_ptr,
    expert_ptrs,
    out_ptr,
    word_key_ptr,
    threshold_ptr,
    lower_ptr,
    lower_keep_ptr,
    lower_before_ptr,
    upper_ptr,
    upper_skip_ptr,
    upper_before_ptr,
    factor_ptr,
    weight_ptr,
    scalar_ptr,
    nonfinite_ptr,
    numel,
    num_experts,
    num_words,
    ACC: tl.constexpr,
    KEEP: tl.constexpr,
    BREAK_TIES: tl.constexpr,
    TWO_SIDED: tl.constexpr,
    TASK_VECTORS: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    APPLY_LAMBDA: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
    NONFINITE_KEY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """base + lambda * merge_i(factor_i * keep_i * delta_i); scalar_ptr holds the linear
    divisor and lambda (in ACC, so float64 merges keep float64 scalars)."""
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    vote = tl.zeros((BLOCK,), ACC)
    positive = tl.zeros((BLOCK,), ACC)
    negative = tl.zeros((BLOCK,), ACC)
    positive_weight = tl.zeros((BLOCK,), ACC)
    negative_weight = tl.zeros((BLOCK,), ACC)
    block = tl.program_id(0)
    num_blocks = tl.num_programs(0)
    for i in range(num_experts):
        delta = load_delta(base, expert_ptrs, i, offsets, in_bounds, ACC, TASK_VECTORS)
        if COUNT_NONFINITE:
            tl.atomic_add(nonfinite_ptr + i, count_nonfinite(delta, NONFINITE_KEY))
        if KEEP == 1:
            threshold = tl.load(threshold_ptr + i)
            keep = random_keep(word_key_ptr, i, num_words, offsets, in_bounds, threshold)
            delta = tl.where(keep, delta, 0.0)
        if KEEP == 2:
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
            delta = tl.where(keep, delta, 0.0)
        factor = tl.load(factor_ptr + i)
        if CONSENSUS:
            vote, positive, negative, positive_weight, negative_weight = accumulate_signed(
                delta.to(ACC) * factor,
                tl.load(weight_ptr + i),
                vote,
                positive,
                negative,
                positive_weight,
                negative_weight,
                base.dtype,
            )
        else:
            # One rounding per expert, like the torch path's add_(delta, alpha=factor).
            positive = tl.fma(delta.to(ACC), factor, positive)
    if CONSENSUS:
        mixed = elect_and_mix(
            vote, positive, negative, positive_weight, negative_weight, NORMALIZE, base.dtype
        )
    elif NORMALIZE:
        mixed = positive / tl.load(scalar_ptr)
    else:
        mixed = positive
    store_merged(out_ptr, offsets, in_bounds, base, mixed, tl.load(scalar_ptr + 1), APPLY_LAMBDA)


def launch_merge(
    inputs: MergeInputs,
    factors: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    check_finite: bool,
    random: RandomKeepTables | None = None,
    window: WindowTables | None = None,
) -> torch.Tensor:
    """Run the fused merge pass; without `random` or `window` every entry is kept.

    `factors[i]` multiplies expert i's (kept) delta; the consensus divisor sums `inputs.weights`.
    """
    out = torch.empty_like(inputs.base)
    if inputs.numel == 0:
        return out.view(inputs.shape)
    device = inputs.base.device
    nonfinite = torch.zeros(inputs.num_experts, dtype=torch.int32, device=device)
    unused = torch.zeros(1, dtype=torch.int64, device=device)
    keep = KEEP_RANDOM if random is not None else KEEP_WINDOW if window is not None else KEEP_ALL
    word_keys = random.word_keys if random is not None else unused
    _merge_kernel[merge_grid(inputs, BLOCK)](
        inputs.base,
        expert_pointer_table(inputs.experts),
        out,
        word_keys,
        random.thresholds if random is not None else unused,
        *(
            (w.lower, w.lower_keep, w.lower_before, w.upper, w.upper_skip, w.upper_before)
            if (w := window) is not None
            else (unused,) * 6
        ),
        factor_table(factors, inputs),
        factor_table(inputs.weights, inputs),
        factor_table([linear_divisor(inputs.weights), lambda_], inputs),
        nonfinite,
        inputs.numel,
        inputs.num_experts,
        word_keys.shape[-1],
        ACC=accumulator(inputs),
        KEEP=keep,
        BREAK_TIES=window is not None and window.break_ties,
        TWO_SIDED=window is not None and window.two_sided,
        TASK_VECTORS=inputs.task_vectors,
        CONSENSUS=consensus,
        NORMALIZE=normalize,
        APPLY_LAMBDA=lambda_ != 1.0,
        COUNT_NONFINITE=check_finite,
        NONFINITE_KEY=NONFINITE_KEY[inputs.base.dtype],
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    if check_finite:
        raise_for_nonfinite(inputs.base, nonfinite.tolist())
    return out.view(inputs.shape)
