"""Trim or drop a task vector once, merge it in many subsets: the sweep's fast path.

TIES trims, and DARE drops and rescales, each expert's delta on its own, so in a sweep over many
subsets of a pool that work need not be repeated per subset. These functions split the fused
merges into that per-expert preparation and one merge pass over prepared task vectors, with the
same decisions and the same arithmetic, so that

    ties_merge(base, experts, weights=w, densities=d)
      == merge_task_vectors(base, [trim(e - base, d_i) ...], weights=w, consensus=True,
                            normalize=True)

bit for bit, and likewise for `dare_merge` with `drop(..., expert_index=i)` and its scales.
Preparation runs in torch on the tensor's device (once per expert); the merge pass is the fused
kernel on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .api import Backend, kernel_device, use_triton
from .inputs import (
    KEY_BITS,
    NONFINITE_KEY,
    check_density,
    check_lambda,
    check_rescale,
    check_seed,
    check_tensor_values,
    per_expert_floats,
    prepare_inputs,
)
from .philox import expert_key, keep_threshold, philox_uniform32
from .reference import CHUNK, weighted_merge_torch
from .scales import dare_factors
from .selection import (
    MagnitudeThreshold,
    kept_count,
    magnitude_keep,
    magnitude_key,
    radix_select,
)


def trim(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the `max(1, int(density * numel))` largest magnitudes (ties at the
    threshold: lowest index first), zero the rest.

    >>> trimmed = trim(expert - base, density=0.2)
    """
    flat = _flat_task_vector(task_vector, density)
    k = kept_count(density, flat.numel())
    key = magnitude_key(flat)
    nonfinite_key = NONFINITE_KEY[flat.dtype]

    def check_top_digit(counts: torch.Tensor, shift: int) -> None:
        _check_finite(int(counts[nonfinite_key >> shift :].sum()))

    if k >= flat.numel():
        _check_finite(int((key >= nonfinite_key).sum()))
        return task_vector.clone()
    threshold = radix_select(lambda: iter((key,)), k, KEY_BITS[flat.dtype], check_top_digit)
    return _apply_keep(flat, key, threshold).view_as(task_vector)


def drop(
    task_vector: torch.Tensor,
    density: float,
    *,
    rescale: str | None = "l1",
    seed: int = 0,
    stream: int = 0,
    expert_index: int = 0,
) -> tuple[torch.Tensor, float]:
    """DARE drop: the task vector with each entry kept with probability `density`, and the
    factor its kept entries are to be scaled by (L1 matching, 1/density, or 1).

    Keep decisions are those `dare_merge(..., seed=seed, stream=stream)` makes for the expert at
    position `expert_index`.

    >>> dropped, scale = drop(expert - base, 0.8, rescale="inverse", seed=1, expert_index=3)
    """
    flat = _flat_task_vector(task_vector, density)
    check_rescale(rescale)
    key = expert_key(check_seed(seed), check_seed(stream, "stream"), expert_index)
    threshold = keep_threshold(density)
    dropped = torch.empty_like(flat)
    before = after = 0.0
    for start in range(0, flat.numel(), CHUNK):
        delta = flat[start : start + CHUNK]
        draws = philox_uniform32(key, start, delta.numel(), device=delta.device)
        dropped[start : start + CHUNK] = torch.where(draws < threshold, delta, 0)
        magnitude = delta.abs().float()
        before += float(magnitude.sum(dtype=torch.float64))
        after += float(dropped[start : start + CHUNK].abs().float().sum(dtype=torch.float64))
    if not math.isfinite(before):
        _check_finite(int((~torch.isfinite(flat)).sum()))
    (scale,) = dare_factors((1.0,), (density,), rescale, [(before, after)])
    return dropped.view_as(task_vector), scale


def merge_task_vectors(
    base: torch.Tensor,
    task_vectors: Sequence[torch.Tensor] | torch.Tensor,
    *,
    weights: Sequence[float],
    scales: Sequence[float] | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lambda_: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """base + lambda * merge of weight_i * scale_i * task_vector_i, in one pass.

    `consensus=True` elects signs and averages the agreeing vectors (TIES, DARE-TIES; the
    divisor sums `weights`), False sums them (divided by sum of weights if `normalize`).
    """
    inputs = prepare_inputs(base, task_vectors, weights, task_vectors=True)
    lambda_ = check_lambda(lambda_)
    k = inputs.num_experts
    scales = (1.0,) * k if scales is None else per_expert_floats("scales", scales, k)
    factors = [w * s for w, s in zip(inputs.weights, scales, strict=True)]
    options = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    if use_triton(backend, inputs):
        from .merge_pass import launch_merge

        with kernel_device(inputs):
            return launch_merge(
                inputs, factors, keys=None, thresholds=None, check_finite=True, **options
            )
    return weighted_merge_torch(inputs, factors, **options)


def _check_finite(nonfinite: int) -> None:
    if nonfinite:
        raise ValueError(
            f"the task vector has {nonfinite} non-finite values (NaN or Inf): a corrupted expert "
            "or base, or a delta that overflowed float16. Repair the checkpoint (torch.nan_to_num) "
            "or compute the task vector in float32 or bfloat16."
        )


def _flat_task_vector(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    if not isinstance(task_vector, torch.Tensor):
        raise TypeError(f"a task vector must be a torch.Tensor, got {type(task_vector).__name__}")
    check_tensor_values(task_vector, "the task vector")
    check_density(density)
    return task_vector.reshape(-1).contiguous()


def _apply_keep(
    flat: torch.Tensor, key: torch.Tensor, threshold: MagnitudeThreshold
) -> torch.Tensor:
    trimmed = torch.empty_like(flat)
    ties_before = 0
    for start in range(0, flat.numel(), CHUNK):
        keep, ties = magnitude_keep(key[start : start + CHUNK], threshold, ties_before)
        ties_before += ties
        trimmed[start : start + CHUNK] = torch.where(keep, flat[start : start + CHUNK], 0)
    return trimmed
