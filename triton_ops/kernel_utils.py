"""Triton building blocks shared by the merge kernels, and launch helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import MergeInputs

KEY_SENTINEL = 2**63 - 1  # above every |delta| key: "no upper bound", or "keep nothing" as a lower


def expert_pointer_table(experts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Device int64 table of expert data pointers: k experts without stacking them."""
    pointers = [e.data_ptr() for e in experts]
    return torch.tensor(pointers, dtype=torch.int64, device=experts[0].device)


def factor_table(values: list[float] | tuple[float, ...], inputs: MergeInputs) -> torch.Tensor:
    """Per-expert floats in the accumulator dtype (float64 for float64 merges, else fp32)."""
    return torch.tensor(values, dtype=inputs.accumulator_dtype, device=inputs.base.device)


def merge_grid(inputs: MergeInputs, block: int) -> tuple[int]:
    return (triton.cdiv(inputs.numel, block),)


@triton.jit
def block_offsets(numel, BLOCK: tl.constexpr):
    # int64 offsets: tensors of 2**31 or more elements (embeddings of large vocabularies).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    return start, offsets, offsets < numel


def accumulator(inputs: MergeInputs) -> tl.dtype:
    """The kernels' ACC constexpr: float64 for float64 merges, else fp32."""
    return tl.float64 if inputs.base.dtype == torch.float64 else tl.float32


@triton.jit
def load_delta(
    base, expert_ptrs, index, offsets, in_bounds, ACC: tl.constexpr, TASK_VECTORS: tl.constexpr
):
    """Expert `index` minus the base, rounded to the compute dtype as mergekit forms it; with
    TASK_VECTORS the pointers hold such deltas already.

    Subtracting in the accumulator dtype and rounding once equals the compute dtype's own
    subtraction (fp32 has more than twice the precision of bf16 and fp16).
    """
    expert_ptr = tl.load(expert_ptrs + index).to(tl.pointer_type(base.dtype))
    expert = tl.load(expert_ptr + offsets, mask=in_bounds, other=0.0)
    if TASK_VECTORS:
        return expert
    else:
        return round_to(expert.to(ACC) - base.to(ACC), base.dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 (or float64) to `dtype`, rounding to nearest even like torch and the GPU's cvt.rn.

    bf16 rounds by integer arithmetic because the Triton interpreter's fp32->bf16 cast truncates.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
        return (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def magnitude_key(delta):
    """|delta|'s bit pattern as an integer (int64 for float64, else int32): integer order equals
    magnitude order."""
    if tl.constexpr(delta.dtype == tl.float64):
        return delta.to(tl.int64, bitcast=True) & 0x7FFFFFFFFFFFFFFF
    elif tl.constexpr(delta.dtype == tl.float32):
        return delta.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        return delta.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def count_nonfinite(delta, NONFINITE_KEY: tl.constexpr):
    return tl.sum((magnitude_key(delta) >= NONFINITE_KEY).to(tl.int32))


@triton.jit
def mix32(x):
    """lowbias32 of uint32 words (keep_hash.mix32)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def random_keep(word_key_ptr, index, num_words, offsets, in_bounds, threshold):
    """DARE keep mask of the entries at `offsets` (keep_hash: a 31-bit draw below the threshold).

    Every lane loads its word's key; a block never straddles a 2**32 boundary (BLOCK divides
    2**32), so that is one cached address."""
    word = tl.where(in_bounds, offsets >> 32, 0)
    word_key = tl.load(word_key_ptr + index * num_words + word)
    low = offsets.to(tl.uint32) ^ word_key.to(tl.uint32)  # int64 -> uint32 keeps the low word
    # Shifting the top bit out (rather than masking with an int literal, which the interpreter
    # promotes through int32) leaves the low 31 bits.
    draw = (mix32(low) << 1) >> 1
    return draw.to(tl.int64) < threshold


@triton.jit
def tie_rank(at_bound, before):
    """Position of each entry among the block's entries tied at a bound, plus those before."""
    ties = at_bound.to(tl.int64)
    return tl.cumsum(ties, 0) - ties + before


@triton.jit
def expert_window_keep(
    key,
    in_bounds,
    expert,
    block,
    num_blocks,
    lower_ptr,
    lower_keep_ptr,
    lower_before_ptr,
    upper_ptr,
    upper_skip_ptr,
    upper_before_ptr,
    BREAK_TIES: tl.constexpr,
    TWO_SIDED: tl.constexpr,
):
    """`window_keep` of one expert's keys in one block, its bounds read from the per-expert
    tables and its tie counts from the [expert, block] tables."""
    lower_before = 0
    upper_before = 0
    if BREAK_TIES:
        lower_before = tl.load(lower_before_ptr + expert * num_blocks + block)
        if TWO_SIDED:
            upper_before = tl.load(upper_before_ptr + expert * num_blocks + block)
    return window_keep(
        key,
        in_bounds,
        tl.load(lower_ptr + expert),
        tl.load(lower_keep_ptr + expert),
        lower_before,
        tl.load(upper_ptr + expert),
        tl.load(upper_skip_ptr + expert),
        upper_before,
        BREAK_TIES,
        TWO_SIDED,
    )


@triton.jit
def window_keep(
    key,
    in_bounds,
    lower,
    lower_keep,
    lower_before,
    upper,
    upper_skip,
    upper_before,
    BREAK_TIES: tl.constexpr,
    TWO_SIDED: tl.constexpr,
):
    """Magnitude-window keep mask (selection.MagnitudeWindow): keys above `lower` and below
    `upper`; of those tied at `lower` the first `lower_keep`, at `upper` all but the first
    `upper_skip`, ties ranked by index (`*_before`: the ties in earlier blocks)."""
    if BREAK_TIES:
        at_lower = in_bounds & (key == lower)
        keep = (key > lower) | (at_lower & (tie_rank(at_lower, lower_before) < lower_keep))
    else:
        keep = key >= lower
    if TWO_SIDED:
        if BREAK_TIES:
            at_upper = in_bounds & (key == upper)
            below = (key < upper) | (at_upper & (tie_rank(at_upper, upper_before) >= upper_skip))
        else:
            below = key <= upper
        keep = keep & below
    return keep


@triton.jit
def accumulate_signed(
    weighted,
    weight,
    vote,
    positive,
    negative,
    positive_weight,
    negative_weight,
    dtype: tl.constexpr,
):
    """Add one expert's weighted delta to the vote and to the per-sign sums and divisors.

    The vote adds the product rounded to the compute dtype, and the sign classes are that
    rounded product's, as mergekit decides (its weighted deltas are compute-dtype tensors)."""
    rounded = round_to(weighted, dtype).to(weighted.dtype)
    vote += rounded
    is_positive = rounded > 0
    is_negative = rounded < 0
    positive += tl.where(is_positive, weighted, 0.0)
    negative += tl.where(is_negative, weighted, 0.0)
    positive_weight += tl.where(is_positive, weight, 0.0)
    negative_weight += tl.where(is_negative, weight, 0.0)
    return vote, positive, negative, positive_weight, negative_weight


@triton.jit
def elect_and_mix(
    vote,
    positive,
    negative,
    positive_weight,
    negative_weight,
    NORMALIZE: tl.constexpr,
    dtype: tl.constexpr,
):
    """TIES sign election on the vote rounded to the compute dtype (a zero sum counts as +) and
    the disjoint (weighted) mean."""
    elected_positive = round_to(vote, dtype).to(vote.dtype) >= 0
    mixed = tl.where(elected_positive, positive, negative)
    if NORMALIZE:
        divisor = tl.where(elected_positive, positive_weight, negative_weight)
        mixed = mixed / tl.where(divisor == 0, 1.0, divisor)
    return mixed


@triton.jit
def store_merged(out_ptr, offsets, in_bounds, base, mixed, lambda_, APPLY_LAMBDA: tl.constexpr):
    if APPLY_LAMBDA:
        mixed = mixed * lambda_
    merged = base.to(mixed.dtype) + mixed
    tl.store(out_ptr + offsets, round_to(merged, out_ptr.dtype.element_ty), mask=in_bounds)
