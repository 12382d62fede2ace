"""The autograd path: merges of inputs that require grad, differentiable as mergekit's are.

The keep and sign decisions are the fused path's own (the same keep rules and election, taken
without grad); the merged value is then built from whole-tensor torch ops in the accumulator
dtype, so gradients reach the base and the experts the way mergekit's do: through the kept
deltas, their weights and, with the L1 rescale, the rescale factor. Keep masks, elected signs and
divisors are constants, as in mergekit.
"""

from __future__ import annotations

import torch

from .inputs import MergeInputs
from .reference import KeepAll, Scratch, chunks
from .scales import RESCALE_EPS, linear_divisor

_HALF = (torch.bfloat16, torch.float16)


def differentiable_merge(
    inputs: MergeInputs,
    keep,
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
    rescale: str | None,
) -> torch.Tensor:
    """base + lambda * merge_i(weight_i * scale_i * keep_i * delta_i) with autograd.

    `rescale`: "l1" (mergekit's L1 matching, differentiable), "inverse" (1/density) or None.
    """
    dtype, acc = inputs.base.dtype, inputs.accumulator_dtype
    weighted = []
    for index in range(inputs.num_experts):
        delta = inputs.experts[index]
        if not inputs.task_vectors:
            delta = delta - inputs.base  # in the compute dtype, as mergekit forms it
        mask = _keep_mask(inputs, keep, index, delta.detach())
        kept = torch.where(mask, delta.to(acc), 0.0)
        weighted.append(
            kept
            * (
                inputs.weights[index]
                * _scale(delta.to(acc), kept, rescale, inputs.densities[index])
            )
        )
    if consensus:
        mixed, divisor = _agreeing_sum(weighted, inputs.weights, dtype)
    else:
        mixed = _sum(weighted)
        divisor = linear_divisor(inputs.weights)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1.0:
        mixed = mixed * lambda_
    return (inputs.base.to(acc) + mixed).to(dtype).view(inputs.shape)


def _keep_mask(inputs: MergeInputs, keep, index: int, delta: torch.Tensor) -> torch.Tensor:
    """The keep rule's decisions for one expert as a bool tensor (computed chunk by chunk)."""
    if isinstance(keep, KeepAll):
        return torch.ones_like(delta, dtype=torch.bool)
    scratch = Scratch.for_inputs(inputs)
    masks = []
    with torch.no_grad():
        for start, stop in chunks(delta.numel()):
            chunk = delta[start:stop]
            bits = keep.bits(index, start, chunk, scratch)
            masks.append(torch.ones_like(chunk, dtype=torch.bool) if bits is None else bits != 0)
    return torch.cat(masks) if masks else torch.zeros_like(delta, dtype=torch.bool)


def _scale(delta: torch.Tensor, kept: torch.Tensor, rescale: str | None, density: float):
    if rescale == "inverse" and density < 1.0:
        return 1.0 / density
    if rescale != "l1":
        return 1.0
    before, after = delta.abs().sum(), kept.abs().sum()
    if float(before.detach()) < RESCALE_EPS or float(after.detach()) < RESCALE_EPS:
        return 1.0
    return before / after


def _agreeing_sum(
    weighted: list[torch.Tensor], weights: tuple[float, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The election of reference._consensus_chunk (rounded products, their rounded sum), then the
    sum of the agreeing weighted deltas and the sum of their weights (a constant divisor)."""
    with torch.no_grad():
        rounded = [w.to(dtype).to(w.dtype) if dtype in _HALF else w for w in weighted]
        vote = _sum(rounded)
        elected = (vote.to(dtype) if dtype in _HALF else vote) >= 0
        agree = [torch.where(elected, r > 0, r < 0) for r in rounded]
        divisor = _sum([a.to(vote.dtype) * w for a, w in zip(agree, weights, strict=True)])
        divisor = torch.where(divisor == 0, 1.0, divisor)
    mixed = _sum([torch.where(a, w, 0.0) for a, w in zip(agree, weighted, strict=True)])
    return mixed, divisor


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum in list order (the kernels' and the torch path's order)."""
    total = tensors[0]
    for tensor in tensors[1:]:
        total = total + tensor
    return total
