"""Fused DARE merge (drop and rescale), with or without TIES sign consensus.

Keep decisions come from counter-based draws (see keep_hash.py), so the L1 pass and the merge
pass regenerate the same mask instead of storing it. Passes over the inputs:
1. Only for `rescale="l1"`: per block and expert, sum |delta| and sum |kept delta| (per-block
   partials, summed by torch: deterministic), and count non-finite deltas.
2. The merge (merge_pass): drop, scale by weight x rescale factor, then a plain sum or the
   sign-elected disjoint mean, base added and the output written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import NONFINITE_KEY, MergeInputs, raise_for_nonfinite
from .keep_hash import expert_key, keep_threshold, word_keys
from .kernel_utils import (
    accumulator,
    block_offsets,
    count_nonfinite,
    expert_pointer_table,
    load_delta,
    merge_grid,
    random_keep,
)
from .merge_pass import BLOCK, NUM_WARPS, RandomKeepTables, launch_merge
from .scales import dare_factors


@triton.jit
def _dare_l1_kernel(
    base_ptr,
    expert_ptrs,
    word_key_ptr,
    threshold_ptr,
    partial_ptr,
    nonfinite_ptr,
    numel,
    num_experts,
    num_words,
    ACC: tl.constexpr,
    NONFINITE_KEY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _, offsets, in_bounds = block_offsets(numel, BLOCK)
    base = tl.load(base_ptr + offsets, mask=in_bounds, other=0.0)
    num_blocks = tl.num_programs(0)
    for i in range(num_experts):
        delta = load_delta(base, expert_ptrs, i, offsets, in_bounds, ACC, False)
        magnitude = tl.abs(delta.to(ACC))
        threshold = tl.load(threshold_ptr + i)
        keep = random_keep(word_key_ptr, i, num_words, offsets, in_bounds, threshold)
        row = partial_ptr + 2 * i * num_blocks + tl.program_id(0)
        tl.store(row, tl.sum(magnitude))
        tl.store(row + num_blocks, tl.sum(tl.where(keep, magnitude, 0.0)))
        tl.atomic_add(nonfinite_ptr + i, count_nonfinite(delta, NONFINITE_KEY))


def dare_merge_triton(
    inputs: MergeInputs,
    *,
    consensus: bool,
    normalize: bool,
    rescale: str | None,
    lambda_: float,
    seed: int,
    stream: int,
) -> torch.Tensor:
    device = inputs.base.device
    keys = [expert_key(seed, stream, i) for i in range(inputs.num_experts)]
    # Word keys as non-negative int64 (the kernel reads their low 32 bits).
    tables = RandomKeepTables(
        word_keys=torch.tensor(
            [[w & 0xFFFFFFFF for w in word_keys(key, inputs.numel)] for key in keys],
            dtype=torch.int64,
            device=device,
        ),
        thresholds=torch.tensor(
            [keep_threshold(d) for d in inputs.densities], dtype=torch.int64, device=device
        ),
    )
    l1_sums = _l1_sums(inputs, tables) if rescale == "l1" else None
    factors = dare_factors(inputs.weights, inputs.densities, rescale, l1_sums)
    return launch_merge(
        inputs,
        factors,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        check_finite=l1_sums is None,
        random=tables,
    )


def _l1_sums(inputs: MergeInputs, tables: RandomKeepTables) -> list[tuple[float, float]]:
    grid = merge_grid(inputs, BLOCK)
    device = inputs.base.device
    partial = torch.zeros(
        (inputs.num_experts, 2, grid[0]), dtype=inputs.accumulator_dtype, device=device
    )
    nonfinite = torch.zeros(inputs.num_experts, dtype=torch.int32, device=device)
    if inputs.numel:
        _dare_l1_kernel[grid](
            inputs.base,
            expert_pointer_table(inputs.experts),
            tables.word_keys,
            tables.thresholds,
            partial,
            nonfinite,
            inputs.numel,
            inputs.num_experts,
            tables.word_keys.shape[1],
            ACC=accumulator(inputs),
            NONFINITE_KEY=NONFINITE_KEY[inputs.base.dtype],
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,
        )
    raise_for_nonfinite(inputs.base, nonfinite.tolist())
    return [tuple(pair) for pair in partial.sum(2, dtype=torch.float64).tolist()]
