"""Triton building blocks shared by the merge kernels, and launch helpers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .inputs import MergeInputs


def expert_pointer_table(experts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Device int64 table of expert data pointers: k experts without stacking them."""
    pointers = [e.data_ptr() for e in experts]
    return torch.tensor(pointers, dtype=torch.int64, device=experts[0].device)


def float32_table(values: list[float] | tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def merge_grid(inputs: MergeInputs, block: int) -> tuple[int]:
    return (triton.cdiv(inputs.numel, block),)


@triton.jit
def block_offsets(numel, BLOCK: tl.constexpr):
    # int64 offsets: tensors of 2**31 or more elements (embeddings of large vocabularies).
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    return start, offsets, offsets < numel


@triton.jit
def load_delta(base, expert_ptrs, index, offsets, in_bounds, TASK_VECTORS: tl.constexpr = False):
    """Expert `index` minus the base, rounded to the compute dtype as mergekit forms it; with
    TASK_VECTORS the pointers hold such deltas already.

    Subtracting in fp32 and rounding once equals the compute dtype's own subtraction (fp32 has
    more than twice the precision of bf16 and fp16, so the double rounding is innocuous).
    """
    expert_ptr = tl.load(expert_ptrs + index).to(tl.pointer_type(base.dtype))
    expert = tl.load(expert_ptr + offsets, mask=in_bounds, other=0.0)
    if TASK_VECTORS:
        return expert
    else:
        return round_to(expert.to(tl.float32) - base.to(tl.float32), base.dtype)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 to `dtype`, rounding to nearest even like torch and the GPU's cvt.rn.

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
    """|delta|'s bit pattern as int32: integer order equals magnitude order."""
    if tl.constexpr(delta.dtype == tl.float32):
        return delta.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    else:
        return delta.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF


@triton.jit
def count_nonfinite(delta, NONFINITE_KEY: tl.constexpr):
    return tl.sum((magnitude_key(delta) >= NONFINITE_KEY).to(tl.int32))


@triton.jit
def random_keep(key, start, threshold, BLOCK: tl.constexpr):
    """DARE keep mask of the block at `start`: four elements per Philox call (see philox.py)."""
    counters = start // 4 + tl.arange(0, BLOCK // 4)
    r0, r1, r2, r3 = tl.randint4x(key, counters)
    draws = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK,))
    return draws.to(tl.int64) < threshold


@triton.jit
def accumulate_signed(weighted, weight, positive, negative, positive_weight, negative_weight):
    """Add one expert's weighted delta to the per-sign sums and per-sign divisors."""
    is_positive = weighted > 0
    is_negative = weighted < 0
    positive += tl.where(is_positive, weighted, 0.0)
    negative += tl.where(is_negative, weighted, 0.0)
    positive_weight += tl.where(is_positive, weight, 0.0)
    negative_weight += tl.where(is_negative, weight, 0.0)
    return positive, negative, positive_weight, negative_weight


@triton.jit
def elect_and_mix(positive, negative, positive_weight, negative_weight, NORMALIZE: tl.constexpr):
    """TIES sign election (a zero sum counts as +) and the disjoint (weighted) mean."""
    elected_positive = positive + negative >= 0
    mixed = tl.where(elected_positive, positive, negative)
    if NORMALIZE:
        divisor = tl.where(elected_positive, positive_weight, negative_weight)
        mixed = mixed / tl.where(divisor == 0, 1.0, divisor)
    return mixed


@triton.jit
def store_merged(out_ptr, offsets, in_bounds, base, mixed, lambda_, APPLY_LAMBDA: tl.constexpr):
    if APPLY_LAMBDA:
        mixed = mixed * lambda_
    merged = base.to(tl.float32) + mixed
    tl.store(out_ptr + offsets, round_to(merged, out_ptr.dtype.element_ty), mask=in_bounds)
