"""Trim or drop a task vector once, merge it in many subsets: the sweep's fast path.

TIES and Breadcrumbs trim, and DARE drops and rescales, each expert's delta on its own, so in a
sweep over many subsets of a pool that work need not be repeated per subset. These functions
split the fused merges into that per-expert preparation and one merge pass over prepared task
vectors, with the same decisions and the same arithmetic, so that

    ties_merge(base, experts, weights=w, densities=d)
      == merge_task_vectors(base, [trim(e - base, d_i) ...], weights=w, consensus=True,
                            normalize=True)

bit for bit, and likewise for `breadcrumbs_merge` with `trim(..., gamma=g_i)` and for
`dare_merge` with `drop(..., expert_index=i)` and its scales. Preparation runs in torch on the
tensor's device (once per expert); the merge pass is the fused kernel on CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from .api import Backend, kernel_device, use_triton
from .inputs import (
    BITS_DTYPE,
    MergeInputs,
    check_density,
    check_gamma,
    check_lambda,
    check_rescale,
    check_seed,
    check_tensor_values,
    per_expert_floats,
    prepare_inputs,
)
from .keep_hash import expert_key, keep_threshold
from .scales import dare_factors
from .selection import outlier_window, top_window


def trim(task_vector: torch.Tensor, density: float, *, gamma: float | None = None) -> torch.Tensor:
    """TIES trim: keep the `max(1, int(density * numel))` largest magnitudes (ties at the
    threshold: lowest index first), zero the rest. With `gamma`, the Breadcrumbs trim: drop the
    `int(gamma * numel)` largest first, keep the next `int(density * numel)`.

    >>> trimmed = trim(expert - base, density=0.2)
    """
    inputs = _task_vector_inputs(task_vector, density)
    numel = inputs.numel
    window = (
        top_window(density, numel)
        if gamma is None
        else outlier_window(density, check_gamma(gamma), numel)
    )
    with reference.single_threaded():
        return _apply(inputs, reference.magnitude_keep(inputs, [window])).view_as(task_vector)


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
    inputs = _task_vector_inputs(task_vector, density)
    check_rescale(rescale)
    keep = reference.RandomKeep(
        keys=[expert_key(check_seed(seed), check_seed(stream, "stream"), expert_index)],
        thresholds=[keep_threshold(density)],
        inputs=inputs,
        check_finite=False,
    )
    with reference.single_threaded():
        (sums,) = reference.l1_sums_torch(inputs, keep)
        dropped = _apply(inputs, keep).view_as(task_vector)
    (scale,) = dare_factors((1.0,), (density,), rescale, [sums])
    return dropped, scale


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
            return launch_merge(inputs, factors, check_finite=True, **options)
    with reference.single_threaded():
        return reference.weighted_merge_torch(inputs, factors, **options)


def _task_vector_inputs(task_vector: torch.Tensor, density: float) -> MergeInputs:
    if not isinstance(task_vector, torch.Tensor):
        raise TypeError(f"a task vector must be a torch.Tensor, got {type(task_vector).__name__}")
    check_tensor_values(task_vector, "the task vector")
    flat = task_vector.detach().reshape(-1).contiguous()
    inputs = MergeInputs(
        base=torch.zeros_like(flat),
        experts=(flat,),
        shape=task_vector.shape,
        weights=(1.0,),
        densities=(check_density(density),),
        task_vectors=True,
    )
    with reference.single_threaded():
        nonfinite = reference.count_nonfinite(inputs, 0)
    if nonfinite:
        raise ValueError(
            f"the task vector has {nonfinite} non-finite values (NaN or Inf): a corrupted expert "
            "or base, or a delta that overflowed float16. Repair the checkpoint (torch.nan_to_num) "
            "or compute the task vector in float32 or bfloat16."
        )
    return inputs


def _apply(inputs: MergeInputs, keep) -> torch.Tensor:
    """The task vector with the entries `keep` drops zeroed."""
    flat = inputs.experts[0]
    out = torch.empty_like(flat)
    scratch = reference.Scratch.for_inputs(inputs)
    for start, stop in reference.chunks(flat.numel()):
        chunk = out[start:stop].copy_(flat[start:stop])
        mask = keep.bits(0, start, chunk, scratch)
        if mask is not None:
            chunk.view(BITS_DTYPE[chunk.dtype]).bitwise_and_(mask)
    return out
