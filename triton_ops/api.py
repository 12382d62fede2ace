"""Public merge functions: validate once, then run the fused Triton kernel or the torch path.

Inputs that require grad (with grad mode on) take the autograd path instead: the same keep and
sign decisions, differentiable like mergekit's merge (`differentiable.py`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Literal

import torch

from . import reference
from .differentiable import differentiable_merge
from .inputs import (
    ExpertsLike,
    MergeInputs,
    check_gamma,
    check_lambda,
    check_rescale,
    check_seed,
    per_expert_floats,
    prepare_inputs,
)
from .selection import outlier_window, top_window

Backend = Literal["auto", "triton", "torch"]


def ties_merge(
    base: torch.Tensor,
    experts: ExpertsLike,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    normalize: bool = True,
    rescale: bool = False,
    lambda_: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """TIES: trim each delta to its top-density magnitudes, elect signs, average the agreeing.

    Matches mergekit's `ties` (docs/numerics.md): exactly `max(1, int(density * numel))` entries
    kept per expert (ties at the threshold: lowest index first), sign elected from the sum of
    weighted trimmed deltas, disjoint weighted mean when `normalize`, fp32 accumulation.
    `rescale=True` matches each trimmed delta's L1 norm to the full delta's (mergekit's option).

    >>> merged = ties_merge(base, [e1, e2, e3], weights=[1, 1, 1], densities=[0.2] * 3)
    """
    inputs = prepare_inputs(base, experts, weights, densities)
    windows = [top_window(d, inputs.numel) for d in inputs.densities]
    return _magnitude_merge(inputs, windows, True, normalize, rescale, lambda_, backend)


def breadcrumbs_merge(
    base: torch.Tensor,
    experts: ExpertsLike,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    consensus: bool = False,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Model Breadcrumbs: drop each delta's largest `gamma` share, keep the next `density` share.

    mergekit's `breadcrumbs` (`consensus=False`) and `breadcrumbs_ties` (`consensus=True`), with
    its counts: `int(gamma * numel)` outliers, `int(density * numel)` kept (fewer outliers when
    both do not fit); ties at either bound broken lowest index first.

    >>> merged = breadcrumbs_merge(base, experts, weights=[0.5] * 2, densities=[0.9] * 2,
    ...                            gammas=[0.01] * 2)
    """
    inputs = prepare_inputs(base, experts, weights, densities)
    gammas = [
        check_gamma(g, f"gamma of expert {i}")
        for i, g in enumerate(per_expert_floats("gammas", gammas, inputs.num_experts))
    ]
    windows = [
        outlier_window(d, g, inputs.numel) for d, g in zip(inputs.densities, gammas, strict=True)
    ]
    return _magnitude_merge(inputs, windows, consensus, normalize, rescale, lambda_, backend)


def dare_merge(
    base: torch.Tensor,
    experts: ExpertsLike,
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    consensus: bool = False,
    normalize: bool = False,
    rescale: Literal["l1", "inverse"] | None = "l1",
    lambda_: float = 1.0,
    seed: int = 0,
    stream: int = 0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """DARE: drop each delta entry with probability 1 - density, rescale, then merge.

    `consensus=True` is mergekit's `dare_ties`, False its `dare_linear`. `rescale="l1"` matches
    the kept deltas' L1 norm to the full delta's (mergekit), "inverse" divides by density (the
    DARE paper). Keep decisions depend only on (seed, stream, expert index, element index), so
    every backend keeps the same entries; they differ from mergekit's `torch.bernoulli` stream.

    >>> merged = dare_merge(base, experts, weights=[0.5, 0.5], densities=[0.8, 0.8], seed=1)
    """
    inputs = prepare_inputs(base, experts, weights, densities)
    options = dict(
        consensus=consensus,
        normalize=normalize,
        rescale=check_rescale(rescale),
        lambda_=check_lambda(lambda_),
        seed=check_seed(seed),
        stream=check_seed(stream, "stream"),
    )
    triton = use_triton(backend, inputs)
    if inputs.needs_autograd:
        with torch.no_grad():
            keep = reference.dare_keep(inputs, options.pop("seed"), options.pop("stream"))
        return differentiable_merge(inputs, keep, **options)
    if triton:
        from .dare import dare_merge_triton

        with kernel_device(inputs):
            return dare_merge_triton(inputs, **options)
    with reference.single_threaded():
        return reference.dare_merge_torch(inputs, **options)


def task_arithmetic(
    base: torch.Tensor,
    experts: ExpertsLike,
    *,
    weights: Sequence[float],
    normalize: bool = False,
    lambda_: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Task arithmetic: base + lambda * sum_i weight_i * delta_i (over sum_i weight_i if normalize).

    The paper's Average is `weights=[1/k] * k`; its TA adds `lambda_=0.8`.

    >>> average = task_arithmetic(base, experts, weights=[1 / len(experts)] * len(experts))
    """
    inputs = prepare_inputs(base, experts, weights)
    lambda_ = check_lambda(lambda_)
    triton = use_triton(backend, inputs)
    if inputs.needs_autograd:
        return differentiable_merge(
            inputs,
            reference.KeepAll(),
            consensus=False,
            normalize=normalize,
            lambda_=lambda_,
            rescale=None,
        )
    if triton:
        from .linear import task_arithmetic_triton

        with kernel_device(inputs):
            return task_arithmetic_triton(inputs, normalize=normalize, lambda_=lambda_)
    with reference.single_threaded():
        return reference.task_arithmetic_torch(inputs, normalize=normalize, lambda_=lambda_)


def _magnitude_merge(
    inputs: MergeInputs,
    windows: list,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    lambda_: float,
    backend: Backend,
) -> torch.Tensor:
    """TIES and Breadcrumbs: one rank window of |delta| per expert, then the merge."""
    lambda_ = check_lambda(lambda_)
    options = dict(consensus=consensus, normalize=normalize, lambda_=lambda_)
    triton = use_triton(backend, inputs)
    if inputs.needs_autograd:
        with torch.no_grad():
            keep = reference.magnitude_keep(inputs, windows)
        return differentiable_merge(inputs, keep, rescale="l1" if rescale else None, **options)
    if triton:
        from .magnitude import magnitude_merge_triton

        with kernel_device(inputs):
            return magnitude_merge_triton(inputs, windows, rescale=rescale, **options)
    with reference.single_threaded():
        return reference.magnitude_merge_torch(inputs, windows, rescale=rescale, **options)


def use_triton(backend: Backend, inputs: MergeInputs) -> bool:
    on_cuda = inputs.base.is_cuda
    if backend == "auto":
        return on_cuda
    if backend == "torch":
        return False
    if backend != "triton":
        raise ValueError(f"backend={backend!r}; use 'auto', 'triton' or 'torch'.")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before "
            "triton is first imported (the Triton interpreter), or use backend='torch'."
        )
    return True


def kernel_device(inputs: MergeInputs) -> contextlib.AbstractContextManager:
    """Kernels launch on the current CUDA device: make it the tensors' (cuda:1 and beyond)."""
    if inputs.base.is_cuda:
        return torch.cuda.device(inputs.base.device)
    return contextlib.nullcontext()
