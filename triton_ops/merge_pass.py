"""The fused merge pass every method ends with: one read of the base and the (kept) deltas, one
write of the output.

`base + lambda * merge_i(factor_i * keep_i * delta_i)`, where the merge is a plain sum (optionally
over the summed weights) or TIES' sign election and disjoint mean, accumulated in fp32. DARE adds
its counter-based keep decisions (DROP), task arithmetic runs it as is, and a merge of prepared
task vectors (`merge_task_vectors`) reads deltas instead of expert weights (TASK_VECTORS).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .kernel_utils import (
    accumulate_signed,
    block_offsets,
    count_nonfinite,
    elect_and_mix,
    expert_pointer_table,
    float32_table,
    load_delta,
    merge_grid,
    random_keep,
    store_merged,
)
from .scales import linear_divisor

BLOCK = 2048
NUM_WARPS = 8


@triton.jit
def _merge_kernel(
    base_ptr,
    expert_ptrs,
    out_ptr,
    key_ptr,
    threshold_ptr,
    factor_ptr,
    weight_ptr,
    nonfinite_ptr,
    numel,
    num_experts,
    divisor,
    lambda_,
    DROP: tl.constexpr,
    TASK_VECTORS: tl.constexpr,
    CONSENSUS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    APPLY_LAMBDA: tl.constexpr,
    COUNT_NONFINITE: tl.constexpr,
    NONFINITE_KEY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """base + lambda * merge_i(factor_i * keep_i * delta_i); task arithmetic is DROP=False,
    and a merge of prepared task vectors (`merge_task_vectors`) adds TASK_VECTORS."""
    start, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    positive = tl.zeros((BLOCK,), tl.float32)
    negative = tl.zeros((BLOCK,), tl.float32)
    positive_weight = tl.zeros((BLOCK,), tl.float32)
    negative_weight = tl.zeros((BLOCK,), tl.float32)
    for i in range(num_experts):
        delta = load_delta(base, expert_ptrs, i, offsets, in_bounds, TASK_VECTORS)
        if COUNT_NONFINITE:
            tl.atomic_add(nonfinite_ptr + i, count_nonfinite(delta, NONFINITE_KEY))
        weighted = delta.to(tl.float32) * tl.load(factor_ptr + i)
        if DROP:
            keep = random_keep(tl.load(key_ptr + i), start, tl.load(threshold_ptr + i), BLOCK)
            weighted = tl.where(keep, weighted, 0.0)
        if CONSENSUS:
            weight = tl.load(weight_ptr + i)
            positive, negative, positive_weight, negative_weight = accumulate_signed(
                weighted, weight, positive, negative, positive_weight, negative_weight
            )
        else:
            positive += weighted
    if CONSENSUS:
        mixed = elect_and_mix(positive, negative, positive_weight, negative_weight, NORMALIZE)
    elif NORMALIZE:
        mixed = positive / divisor
    else:
        mixed = positive
    store_merged(out_ptr, offsets, in_bounds, base, mixed, lambda_, APPLY_LAMBDA)


def launch_merge(
    inputs: MergeInputs,
    factors: list[float],
    *,
    keys: torch.Tensor | None,
    thresholds: torch.Tensor | None,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    check_finite: bool,
) -> torch.Tensor:
    """Run the fused merge pass; `keys=None` keeps every entry (task arithmetic).

    `factors[i]` multiplies expert i's (kept) delta; the consensus divisor sums `inputs.weights`.
    """
    out = torch.empty_like(inputs.base)
    if inputs.numel == 0:
        return out.view(inputs.shape)
    device = inputs.base.device
    nonfinite = torch.zeros(inputs.num_experts, dtype=torch.int32, device=device)
    drop = keys is not None
    _merge_kernel[merge_grid(inputs, BLOCK)](
        inputs.base,
        expert_pointer_table(inputs.experts),
        out,
        keys if drop else nonfinite,
        thresholds if drop else nonfinite,
        float32_table(factors, device),
        float32_table(inputs.weights, device),
        nonfinite,
        inputs.numel,
        inputs.num_experts,
        linear_divisor(inputs.weights),
        lambda_,
        DROP=drop,
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
