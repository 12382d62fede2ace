"""Model Breadcrumbs: drop the largest `gamma` share of each delta, keep the next `density` share.

The kept counts are mergekit's (`magnitude_outliers`), ties at either bound are broken lowest
index first, and the Triton kernels (under the interpreter) equal the torch path bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from mergekit.sparsify import magnitude_outliers

from tests.merge_problems import draw_problem
from triton_ops import breadcrumbs_merge, merge_task_vectors, trim
from triton_ops.selection import outlier_window

BACKENDS = ("torch", "triton")


def kept_by_merge(delta: torch.Tensor, density: float, gamma: float, backend: str) -> torch.Tensor:
    base = torch.zeros_like(delta)
    merged = breadcrumbs_merge(
        base, [delta], weights=[1.0], densities=[density], gammas=[gamma], backend=backend
    )
    assert torch.equal(merged[merged != 0], delta[merged != 0])
    return merged != 0


def brute_force_window(magnitudes: list[float], lo: int, hi: int) -> list[bool]:
    order = sorted(range(len(magnitudes)), key=lambda i: (-magnitudes[i], i))
    kept = [False] * len(magnitudes)
    for i in order[lo:hi]:
        kept[i] = True
    return kept


@pytest.mark.parametrize(
    ("numel", "density", "gamma"),
    [(1000, 0.5, 0.01), (1000, 0.99, 0.05), (1001, 0.29, 0.9), (7, 0.5, 0.5), (10, 0.05, 0.0)],
)
def test_counts_are_mergekits(numel: int, density: float, gamma: float) -> None:
    # Distinct magnitudes: mergekit's sort order is unambiguous, so its kept set is the window.
    delta = torch.randperm(numel, generator=torch.Generator().manual_seed(numel)).float() + 1
    theirs = magnitude_outliers(delta, density, gamma=gamma) != 0
    window = outlier_window(density, gamma, numel)
    assert window.hi - window.lo == int(theirs.sum())
    for backend in BACKENDS:
        assert torch.equal(kept_by_merge(delta, density, gamma, backend), theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_both_bounds_are_broken_lowest_index_first(backend: str) -> None:
    # |delta| in {1, 2, 3, 4}: both bounds fall inside large tie groups spread over blocks.
    generator = torch.Generator().manual_seed(3)
    delta = torch.randint(1, 5, (9001,), generator=generator).float()
    delta *= torch.randint(0, 2, (9001,), generator=generator) * 2 - 1
    density, gamma = 0.4, 0.3
    window = outlier_window(density, gamma, delta.numel())
    expected = brute_force_window(delta.abs().tolist(), window.lo, window.hi)
    assert kept_by_merge(delta, density, gamma, backend).tolist() == expected


@pytest.mark.parametrize("consensus", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_equals_torch_bit_for_bit(dtype: torch.dtype, consensus: bool) -> None:
    base, experts = draw_problem((37, 1001), 4, dtype, seed=9, deltas="quantized")
    options = dict(
        weights=[0.5, -0.35, 1.25, 0.0],
        densities=[0.9, 0.5, 1.0, 0.2],
        gammas=[0.01, 0.2, 0.0, 0.5],
        consensus=consensus,
        normalize=consensus,
        lambda_=0.8,
    )
    got = breadcrumbs_merge(base, experts, backend="triton", **options)
    assert torch.equal(got, breadcrumbs_merge(base, experts, backend="torch", **options))
    assert not torch.equal(got, base)


def test_trimmed_task_vectors_merge_like_the_fused_call() -> None:
    base, experts = draw_problem((301, 53), 3, torch.bfloat16, seed=10)
    densities, gammas, weights = [0.5, 0.8, 0.3], [0.05, 0.01, 0.1], [0.5, 0.25, 1.0]
    fused = breadcrumbs_merge(
        base, experts, weights=weights, densities=densities, gammas=gammas, consensus=True
    )
    vectors = [
        trim(e - base, d, gamma=g) for e, d, g in zip(experts, densities, gammas, strict=True)
    ]
    assert torch.equal(merge_task_vectors(base, vectors, weights=weights, consensus=True), fused)


@pytest.mark.parametrize("gamma", [-0.1, 1.5], ids=str)
def test_gamma_outside_0_1_is_refused(gamma: float) -> None:
    base, experts = draw_problem((10,), 1, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"gamma of expert 0 is .* it must be in \[0, 1\]"):
        breadcrumbs_merge(base, experts, weights=[1.0], densities=[0.5], gammas=[gamma])
